"""vLLM launch flags that loraserve does not use itself, and what it does with each.

People arrive with a vLLM launch command; replacing `vllm` with `loraserve` must give a server that
does what they meant, or a clear error naming the flag it cannot honour. Flags loraserve implements
(model, LoRA, scheduling, HTTP) live in cli.py. This table covers the rest, each either accepted with
a logged note (it changes memory or logging, never output) or refused unless its value is one that
changes nothing here. Any other unknown flag is refused by argparse, by name.

Read from vLLM 0.11-0.32's `vllm serve --help` (EngineArgs and the OpenAI frontend arguments)."""

from dataclasses import dataclass


class UnsupportedFlagError(ValueError):
    """A vLLM flag whose value would change what loraserve returns, which it cannot honour."""


@dataclass(frozen=True)
class VllmFlag:
    names: tuple[str, ...]
    why: str                                   # what the flag does in vLLM and what loraserve does instead
    allowed: tuple[str, ...] | None = None     # None: a note, any value; else: values accepted, others refused
    takes_value: bool = True


VLLM_FLAGS = [
    VllmFlag(("--tensor-parallel-size", "-tp"), "loraserve runs on one device", allowed=("1",)),
    VllmFlag(("--pipeline-parallel-size", "-pp"), "loraserve runs on one device", allowed=("1",)),
    VllmFlag(("--data-parallel-size", "-dp"), "loraserve runs one engine", allowed=("1",)),
    VllmFlag(("--quantization", "-q"), "loraserve serves unquantized weights (GGUF files are dequantized on "
             "load); quantizing would change outputs", allowed=()),
    VllmFlag(("--kv-cache-dtype",), "the KV cache is kept in the model's dtype", allowed=("auto",)),
    VllmFlag(("--lora-dtype",), "adapters run in the model's dtype", allowed=("auto",)),
    VllmFlag(("--load-format",), "weights load from safetensors or GGUF", allowed=("auto", "safetensors", "gguf")),
    VllmFlag(("--revision", "--tokenizer-revision", "--code-revision"), "there is no model hub: pass a local "
             "model directory or GGUF file", allowed=()),
    VllmFlag(("--gpu-memory-utilization",), "sizes vLLM's KV cache; loraserve sizes it with "
             "--kv-cache-memory-gb or --num-kv-blocks"),
    VllmFlag(("--swap-space",), "CPU swap space for preempted sequences; loraserve recomputes them instead"),
    VllmFlag(("--cpu-offload-gb",), "weight offloading; loraserve keeps weights on its device"),
    VllmFlag(("--enforce-eager",), "loraserve runs eagerly", takes_value=False),
    VllmFlag(("--enable-prefix-caching",), "no prefix cache yet: prompts are recomputed, outputs are the same",
             takes_value=False),
    VllmFlag(("--no-enable-prefix-caching",), "there is no prefix cache", takes_value=False),
    VllmFlag(("--enable-chunked-prefill",), "loraserve always prefills long prompts in chunks", takes_value=False),
    VllmFlag(("--fully-sharded-loras",), "LoRA sharding across devices; loraserve runs on one device",
             takes_value=False),
    VllmFlag(("--disable-log-requests",), "loraserve does not log request contents", takes_value=False),
    VllmFlag(("--disable-log-stats",), "loraserve's statistics are on /metrics", takes_value=False),
    VllmFlag(("--disable-frontend-multiprocessing",), "loraserve runs one process", takes_value=False),
    VllmFlag(("--download-dir",), "there is no model hub: nothing is downloaded"),
    VllmFlag(("--max-logprobs",), "loraserve returns at most 20 top logprobs per token"),
]


def dest(flag: VllmFlag) -> str:
    return "vllm_" + flag.names[0].lstrip("-").replace("-", "_")


def add_vllm_flags(parser) -> None:
    """Add every flag of the table to an argparse parser (or group), documented."""
    for flag in VLLM_FLAGS:
        if flag.allowed is None:
            what = "accepted, changes nothing here: "
        elif flag.allowed:
            what = f"only {' or '.join(flag.allowed)} accepted: "
        else:
            what = "refused: "
        kwargs = {"action": "store_true"} if not flag.takes_value else {"metavar": "VALUE"}
        parser.add_argument(*flag.names, dest=dest(flag), default=None, help="vLLM flag, " + what + flag.why,
                            **kwargs)


def check_vllm_flags(args) -> list[str]:
    """Notes to log for accepted flags; raises UnsupportedFlagError naming the first refused one."""
    notes = []
    for flag in VLLM_FLAGS:
        value = getattr(args, dest(flag), None)
        if value is None or value is False:
            continue
        shown = flag.names[0] if not flag.takes_value else f"{flag.names[0]} {value}"
        if flag.allowed is not None and str(value) not in flag.allowed:
            raise UnsupportedFlagError(f"{shown} is not supported: {flag.why}")
        notes.append(f"{shown}: accepted, changes nothing here ({flag.why})")
    return notes
