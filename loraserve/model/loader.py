"""Load a base model and its tokenizer from a Hugging Face directory or a GGUF file.

GGUF files are dequantized through transformers' GGUF support once, then saved as a safetensors
directory under the cache so later starts load in a second instead of converting again."""

import hashlib
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The base model cannot be loaded; the message says which path and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("LORASERVE_CACHE", Path.home() / ".cache" / "loraserve"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` serves bf16 (AMX on CPU, tensor cores on GPU); float32 is for exactness tests."""
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into a cached safetensors model directory (once per file version)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    log.info("converting %s to a safetensors directory at %s (first start only)", gguf_path, out)
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The dequantized weights are plain floats now; a leftover quantization_config would make
    # transformers try to re-quantize on load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def model_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {path!r} does not exist")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"model file {path!r} is not a .gguf file; pass a model directory or a GGUF file")
        return gguf_to_hf_dir(p)
    if not (p / "config.json").exists():
        raise ModelLoadError(f"model directory {path!r} has no config.json")
    return p


def load_model(path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode on the chosen device and dtype."""
    folder = model_dir(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                 **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model.to(dev).eval(), tokenizer
