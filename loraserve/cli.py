"""The `loraserve` command. Flag names follow vLLM's so a launch command moves over by changing
one word. Argument parsing only: each subcommand turns its flags into a config and hands off."""

import argparse
import json
import logging
import os
from pathlib import Path

from loraserve import __version__, compat
from loraserve.config import EngineConfig, LoRAConfig
from loraserve.tools.cli import add_tool_parsers


class LoRAModulesError(ValueError):
    """A --lora-modules entry that is neither NAME=PATH nor vLLM's JSON object."""


def parse_lora_module(spec: str) -> tuple[str, str, str | None]:
    """One --lora-modules entry -> (name, path, base_model_name). Accepts `NAME=PATH` and vLLM's
    JSON form `{"name": ..., "path": ..., "base_model_name": ...}`."""
    if spec.lstrip().startswith("{"):
        try:
            obj = json.loads(spec)
        except json.JSONDecodeError as err:
            raise LoRAModulesError(f"--lora-modules entry {spec!r} is not valid JSON: {err}") from None
        unknown = set(obj) - {"name", "path", "base_model_name"}
        if unknown:
            raise LoRAModulesError(f"--lora-modules entry {spec!r} has unknown keys: {', '.join(sorted(unknown))}")
        if not isinstance(obj.get("name"), str) or not isinstance(obj.get("path"), str):
            raise LoRAModulesError(f"--lora-modules entry {spec!r} needs string 'name' and 'path'")
        return obj["name"], obj["path"], obj.get("base_model_name")
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise LoRAModulesError(f"--lora-modules entry {spec!r} is not NAME=PATH or a JSON object")
    return name, path, None


SERVE_DESCRIPTION = ("Serve one base model and any LoRA adapters behind an OpenAI-compatible HTTP API with "
                     "continuous batching. Flag names follow vLLM's: a vLLM launch command works with one word "
                     "changed, or fails naming the flag it cannot honour.")


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model (plus LoRA adapters) behind an OpenAI-compatible API",
                              description=SERVE_DESCRIPTION)
    add_serve_args(p)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every `serve` flag; also used by the vLLM-style `python -m loraserve.entrypoints...` modules."""
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory (safetensors + tokenizer) or a .gguf file")
    d = " (default: %(default)s)"

    g = p.add_argument_group("model")
    g.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help="the model, as vLLM's --model (instead of the positional MODEL)")
    g.add_argument("--served-model-name", default=None,
                   help="name clients use in the `model` field (default: the model path's last part)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length: prompt plus completion tokens (default: the model's "
                        "max_position_embeddings; a larger value is refused)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weight and activation dtype; auto = bfloat16" + d)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto picks cuda when available, else cpu" + d)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model directory, as transformers does")
    g.add_argument("--seed", type=int, default=0, help="sampler seed for requests that bring none" + d)
    g.add_argument("--num-threads", type=int, default=None,
                   help="torch threads for the engine (default: OMP_NUM_THREADS if set, else all cores but one, "
                        "left to the HTTP server and clients, as vLLM-CPU reserves one)")
    g.add_argument("--no-prepack-weights", dest="prepack_weights", action="store_false",
                   help="CPU bf16: do not keep packed copies of the linear weights (halves their memory, "
                        "decode steps ~20-35%% slower; plain F.linear, which oneDNN's packing matches bit for bit)")
    g.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                   help="CPU: do not build or use the C++ kernels for bf16 linear layers (AVX512-BF16 CPUs), "
                        "decode attention and multi-LoRA (built on first start, ~20 s each, then cached); "
                        "oneDNN and PyTorch matmuls run instead")
    g.add_argument("--no-helper-thread", dest="helper_thread", action="store_false",
                   help="CPU, one engine thread on 2+ cores: do not let a helper thread share each GEMM's columns, "
                        "the attention's heads and the small ops' rows, and run the adapters' deltas beside the "
                        "base GEMMs on the core left to the HTTP server (the same bits either way)")
    g.add_argument("--no-lean-forward", dest="lean_forward", action="store_false",
                   help="Llama, Qwen2 and Mistral models: run transformers' own layer forward instead of "
                        "loraserve's flat loop over the layers with fused norm, RoPE and SiLU ops (same math; "
                        "a CPU decode step ~18%% shorter with the loop); other models always run transformers' forward")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or a file holding one, used instead of the tokenizer's own")

    g = p.add_argument_group("scheduling and KV cache")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at once" + d)
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens in one packed forward step; longer prompts are prefilled in chunks (default: 512, "
                        "or 128 on CPUs whose bf16 GEMM is the AVX2 path, ~4x less arithmetic a second)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block" + d)
    g.add_argument("--kv-cache-memory-gb", type=float, default=2.0,
                   help="memory for the KV cache, in GiB, unless --num-kv-blocks is set" + d)
    g.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", dest="num_kv_blocks", type=int, default=None,
                   help="exact number of KV-cache blocks (default: sized from --kv-cache-memory-gb)")

    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    g.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help='adapters to serve, each NAME=PATH or JSON {"name": ..., "path": ..., '
                        '"base_model_name": ...}; each NAME becomes a model name; needs --enable-lora')
    g.add_argument("--max-lora-rank", type=int, default=None,
                   help="refuse adapters of a higher rank at load (never clips; default: no cap)")
    g.add_argument("--max-loras", type=int, default=8, help="adapters resident in the running batch at once" + d)
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host memory, least recently used evicted first; others are re-read "
                        "from disk when a request needs them (default: no limit; at least --max-loras)")
    g.add_argument("--allow-runtime-lora", action="store_true",
                   help="open POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's env "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true does too); loads read only under --lora-root")
    g.add_argument("--lora-root", action="append", default=[], metavar="DIR",
                   help="a directory runtime loads may read adapters from (repeatable); '..', other absolute "
                        "paths and symlinks leaving it are refused")
    g.add_argument("--lora-path", default=None, metavar="PATH",
                   help="serve this one adapter under --served-model-name (the base stays reachable under "
                        "its own name: the model path's last part); implies --enable-lora")

    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on" + d)
    g.add_argument("--port", type=int, default=8000, help="port to listen on" + d)
    g.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on the API routes (/health, /version and "
                        "/metrics stay open)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level" + d)
    compat.add_vllm_flags(p.add_argument_group(
        "other vLLM flags", "accepted where they change nothing here (a note is logged), refused by name "
        "where they would change outputs"))
    p.set_defaults(func=serve)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig a parsed `serve` command asks for; raises LoRAModulesError on bad LoRA flags."""
    if (args.model is None) == (args.model_flag is None):
        raise LoRAModulesError("give the model once: as the positional MODEL or as --model")
    args.model = args.model or args.model_flag
    base_name = args.served_model_name
    modules: dict[str, str] = {}
    if args.lora_path:
        # vLLM's demo-server habit: --served-model-name names the adapter, the base keeps its own name.
        adapter_name = args.served_model_name or args.lora_path.rstrip("/").split("/")[-1]
        modules[adapter_name] = args.lora_path
        args.enable_lora, base_name = True, None
    for spec in args.lora_modules:
        name, path, base = parse_lora_module(spec)
        if name in modules:
            raise LoRAModulesError(f"--lora-modules names {name!r} twice")
        if base is not None and base not in {base_name, args.model}:
            raise LoRAModulesError(f"--lora-modules entry {name!r} declares base_model_name {base!r}, but this "
                                   f"server serves {args.served_model_name or args.model!r}")
        modules[name] = path
    if modules and not args.enable_lora:
        raise LoRAModulesError("--lora-modules needs --enable-lora")
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        raise LoRAModulesError(f"--max-cpu-loras {args.max_cpu_loras} is below --max-loras {args.max_loras}: "
                               "every adapter in a device slot is also kept in host memory")
    lora = LoRAConfig(enable_lora=args.enable_lora, lora_modules=modules, max_lora_rank=args.max_lora_rank,
                      max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras)
    return EngineConfig(
        model=args.model, served_model_name=base_name, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb, seed=args.seed,
        prepack_weights=args.prepack_weights, cpu_kernels=args.cpu_kernels, lean_forward=args.lean_forward,
        helper_thread=args.helper_thread,
        trust_remote_code=args.trust_remote_code, lora=lora)


def serving_threads(requested: int | None) -> int | None:
    """Threads for the engine's matmuls when serving. On a small CPU box the HTTP thread and the clients
    need a core too: sharing every core with them stalls each of the ~500 parallel ops of a decode step
    (measured on 2 cores: 1 engine thread served 294 tok/s, 2 threads 224-266). None keeps the
    OMP_NUM_THREADS the user set."""
    if requested is not None:
        return requested
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, len(os.sched_getaffinity(0)) - 1)


def serve(args: argparse.Namespace) -> None:
    # Imported here so `loraserve --help` and the parser tests do not pay for torch.
    import uvicorn

    from loraserve.engine.async_engine import AsyncEngine
    from loraserve.engine.llm_engine import RequestError
    from loraserve.lora.adapter import AdapterError
    from loraserve.model.loader import ModelLoadError
    from loraserve.server.api_server import build_app
    from loraserve.server.lora_admin import runtime_lora_from_env

    log = logging.getLogger(__name__)
    config = engine_config(args)
    # Start-up (model load, KV cache, weight packing) still uses every core; the loop then runs on these.
    config.num_threads = serving_threads(args.num_threads)
    try:
        for note in compat.check_vllm_flags(args):
            log.info(note)
    except compat.UnsupportedFlagError as err:
        raise SystemExit(f"loraserve serve: error: {err}") from None
    try:
        engine = AsyncEngine(config)
    except (ModelLoadError, RequestError, AdapterError) as err:
        raise SystemExit(f"loraserve serve: error: {err}") from None
    if args.chat_template:
        template = Path(args.chat_template)
        engine.tokenizer.chat_template = template.read_text() if template.is_file() else args.chat_template
    if args.lora_path:
        log.info("--lora-path: adapter %s is served as %r; the base model as %r", args.lora_path,
                 engine.model_names()[1], engine.model_names()[0])
    app = build_app(engine, api_key=args.api_key, allow_runtime_lora=args.allow_runtime_lora or runtime_lora_from_env(),
                    lora_roots=args.lora_root)
    log.info("serving %s on http://%s:%d", ", ".join(engine.model_names()), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve", description="One base model plus many LoRA adapters behind an OpenAI-compatible API.")
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(subparsers)
    add_tool_parsers(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Parse, set up logging and run the chosen command; bad LoRA flags become a usage error."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        args.func(args)
    except LoRAModulesError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    run(build_parser(), argv)


if __name__ == "__main__":
    main()
