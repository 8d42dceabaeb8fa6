"""The tools' subcommands for `loraserve`: argument parsing only. Each tool module is imported when its
command runs, so `loraserve --help` and `loraserve verify` (a container healthcheck) never pay for torch.
Every tool exits 0 when all is well, 1 when it found a problem, 2 on a usage error."""

import argparse
import importlib

ADAPTER_HELP = "PEFT adapter directory (adapter_config.json + weights)"
EXIT_CODES = " Exit codes: 0 ok, 1 problem found, 2 usage error."


def _runner(module: str):
    def run(args: argparse.Namespace) -> None:
        raise SystemExit(importlib.import_module(f"loraserve.tools.{module}").run(args))
    return run


def add_tool_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register inspect, doctor, verify and merge."""
    p = subparsers.add_parser(
        "inspect", help="what an adapter contains; with --base, whether it fits and what it changes",
        description="Read a PEFT adapter directory: type and options, rank(s) and alpha(s) per module, target "
                    "modules by type, tensor count and size, and whether it is untrained (every lora_B zero). "
                    "With --base: loraserve's full validation against that model (every tensor must map onto "
                    "a module, shapes included) and the measured effect, the next-token KL divergence of "
                    "adapter vs base on probe prompts." + EXIT_CODES)
    p.add_argument("adapter", help=ADAPTER_HELP)
    p.add_argument("--base", default=None, help="base model (Hugging Face directory or .gguf) to check against")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_runner("inspect"))

    p = subparsers.add_parser(
        "doctor", help="every reason a vLLM launch command would ignore or partly apply an adapter",
        description="Read a vLLM launch command (`vllm serve MODEL ...`, `python -m "
                    "vllm.entrypoints.openai.api_server --model MODEL ...` or `docker run ... vllm/vllm-openai "
                    "...`) and an adapter, and report every reason vLLM would not apply the adapter in full: "
                    "LoRA not enabled, adapter not registered or requested under another name, rank over "
                    "--max-lora-rank, options and modules vLLM refuses or skips, a multimodal prefix mismatch, "
                    "an untrained adapter. Prints the corrected command, or the `loraserve merge` command "
                    "where no flag can fix it. Exit 1 when anything would be dropped." + EXIT_CODES)
    p.add_argument("adapter", help=ADAPTER_HELP)
    p.add_argument("--vllm", required=True, metavar="LAUNCH_COMMAND", help="the vLLM launch command, quoted")
    p.add_argument("--model-name", default=None,
                   help="the `model` your requests send (default: the name the command registers)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_runner("doctor"))

    p = subparsers.add_parser(
        "verify", help="check that a running OpenAI-compatible server applies an adapter",
        description="Against any OpenAI-compatible server: /v1/models must list both names, and the same "
                    "prompts sent to base and adapter at temperature 0 must get different answers (containing "
                    "--expect when given, for every prompt). Fails with the reason: server down, a name not "
                    "listed, the adapter answering like the base." + EXIT_CODES)
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the adapter's model name")
    p.add_argument("--base", required=True, help="the base model's name")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt to send (repeat for several; default: four built-in probes)")
    p.add_argument("--expect", default=None, help="text every adapter answer must contain")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--api", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions or /v1/completions (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_runner("verify"))

    p = subparsers.add_parser(
        "merge", help="bake an adapter into its base model and prove the result equals PEFT",
        description="Merge a PEFT LoRA adapter into its base model (embed_tokens / lm_head LoRA, "
                    "modules_to_save, DoRA, trainable tokens, bias and tied embeddings included), write a "
                    "safetensors model directory with the tokenizer that `loraserve serve` and transformers "
                    "load, then load it back and compare its logits with PeftModel's on probe prompts; over "
                    "the tolerance it fails." + EXIT_CODES)
    p.add_argument("adapter", help=ADAPTER_HELP)
    p.add_argument("--base", required=True, help="base model: Hugging Face directory or .gguf file")
    p.add_argument("--out", required=True, help="directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the written weights; merging and the proof run in float32 (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted |logit difference| against PeftModel, for the float32 merge and, with "
                        "--dtype float32, for the saved files (default: 1e-4, or 1e-5 of the largest logit if that "
                        "is larger)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_runner("merge"))
