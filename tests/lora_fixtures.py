"""Shared helpers for the LoRA tests: tiny random models from real configs, PEFT adapters with
random (trained-looking) weights, and one mixed-adapter packed forward under the forward context."""

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from loraserve.engine.context import ForwardContext, LoRABatch, forward_context
from tiny_models import TEST_DEVICE

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def tiny_model(arch: str = "llama", tie: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny float32 model of a real architecture, deterministic in `seed`."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tie))
    elif arch == "qwen2":  # q/k/v have biases
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=tie))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=tie))
    elif arch == "gemma3":  # scaled embeddings, tied, sliding window
        model = Gemma3ForCausalLM(Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=4))
    elif arch == "gemma4":  # layers 2-3 share KV with earlier layers and have no k_proj/v_proj
        cfg = Gemma4TextConfig(**{**SMALL, "num_hidden_layers": 4}, head_dim=16, global_head_dim=16,
                               vocab_size_per_layer_input=256, hidden_size_per_layer_input=8,
                               sliding_window=4, num_kv_shared_layers=2,
                               layer_types=["sliding_attention", "full_attention"] * 2)
        model = Gemma4ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.to(TEST_DEVICE).eval()


def randomize(peft_model: torch.nn.Module, seed: int) -> None:
    """PEFT initialises B (and DoRA/token deltas) so the adapter is a no-op; make it look trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_B" in name or "lora_embedding_B" in name or "lora_A" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:  # magnitudes, trainable tokens, modules_to_save copies, biases
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.1)


def make_adapter(base: torch.nn.Module, path: Path, seed: int = 1, randomize_weights: bool = True,
                 **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for (a copy of) `base` with random weights; returns its directory."""
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    lora_kwargs.setdefault("r", 4)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    if randomize_weights:
        randomize(peft_model, seed)
    peft_model.save_pretrained(str(path))
    return path


def peft_logits(base: torch.nn.Module, path: Path, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: PEFT's PeftModel alone on a fresh copy of the base."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


def base_logits(base: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return base(input_ids=ids.to(base.device)).logits


def mixed_logits(model: torch.nn.Module, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """One packed forward where row i of `ids` [B, L] uses slot row_slots[i] (-1: base)."""
    token_slots = torch.tensor(row_slots, device=model.device).repeat_interleave(ids.shape[1])
    with torch.no_grad(), forward_context(ForwardContext(lora=LoRABatch.from_token_slots(token_slots))):
        return model(input_ids=ids.to(model.device)).logits
