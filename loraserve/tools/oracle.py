"""The PEFT oracle as the tools use it: the base model on CPU, probe inputs, logits, and an adapter
loaded into PEFT so that every tensor in the file is provably applied.

PEFT is the oracle for `inspect`'s measured effect and for `merge`'s proof, but PEFT itself silently
skips adapter tensors whose names match no module (a multimodal `language_model` prefix on a
text-only base, say). `load_peft` closes that hole: it maps the prefix the way loraserve serves it
and refuses if any tensor is left unloaded."""

import re
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraserve.lora.adapter import PREFIX, AdapterError, read_peft_dir
from loraserve.model.loader import model_dir
from loraserve.tools.common import PROBE_PROMPTS, UsageError


def load_base(path: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The base model (HF directory or GGUF, as `loraserve serve` takes it) on CPU in eval mode, and its
    tokenizer when the directory has one (tiny test models may not)."""
    try:
        folder = model_dir(path)
    except Exception as err:  # ModelLoadError and OS errors: the path is the user's
        raise UsageError(str(err)) from None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    has_tokenizer = any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def probe_inputs(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, count: int = 4) -> list[torch.Tensor]:
    """Token ids [1, L] for each probe: the probe prompts through the tokenizer, or fixed pseudo-random
    ids when there is no tokenizer."""
    if tokenizer is not None:
        return [tokenizer(p, return_tensors="pt").input_ids for p in PROBE_PROMPTS[:count]]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 8 + 3 * i), generator=g) for i in range(count)]


@torch.no_grad()
def logits_of(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 logits [L, vocab] for every probe."""
    return [model(input_ids=ids).logits[0].float() for ids in inputs]


def _text_only(model: nn.Module) -> bool:
    return not any("language_model" in name.split(".") for name, _ in model.named_modules())


def _drop_language_model(name: str) -> str:
    return re.sub(r"(^|\.)language_model\.", r"\1", name)


def remap_for_model(config: dict, tensors: dict[str, torch.Tensor], model: nn.Module
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter trained on a multimodal checkpoint (Gemma 3/4, ...) names the text model
    `...language_model...`; on a text-only base that segment is dropped, as loraserve serves it.
    Returns (config overrides, tensors); with a rename the overrides target exactly the renamed
    modules, so PEFT can neither miss one nor add one."""
    if not _text_only(model) or not any("language_model" in k.split(".") for k in tensors):
        return {}, tensors
    renamed = {_drop_language_model(k): t for k, t in tensors.items()}
    lora_modules = sorted({re.sub(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                                  r"(\.weight|\.bias)?$", "", k[len(PREFIX):])
                           for k in renamed if ".lora_" in k and k.startswith(PREFIX)})
    overrides = {"target_modules": lora_modules}
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            overrides[key] = {_drop_language_model(p): v for p, v in config[key].items()}
    return overrides, renamed


def load_peft(base: nn.Module, adapter_path: str) -> PeftModel:
    """`base` wrapped by PEFT with the adapter loaded, in eval mode; raises AdapterError if any tensor of
    the file is not loaded into the model (PEFT alone would only warn)."""
    config, tensors = read_peft_dir(adapter_path)
    overrides, tensors = remap_for_model(config, tensors, base)
    peft_config = PeftConfig.from_pretrained(adapter_path)
    for key, value in overrides.items():
        setattr(peft_config, key, value)
    peft_config.inference_mode = True
    model = PeftModel(base, peft_config)
    result = set_peft_model_state_dict(model, tensors)
    if result.unexpected_keys:
        shown = ", ".join(sorted(result.unexpected_keys)[:8])
        raise AdapterError(f"PEFT did not load {len(result.unexpected_keys)} adapter tensor(s): {shown}")
    return model.eval()
