"""The forward context: per-step batch metadata that layers deep inside the transformers model
need (paged-attention tables, per-token LoRA slots) but that transformers' forward signature does
not carry. The runner sets it around each packed forward, like vLLM's forward context."""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class LoRABatch:
    """Which LoRA slot each token of the packed batch uses. Slot -1 is the base model."""
    token_slots: torch.Tensor               # [T] int64, -1 = base
    any_lora: bool
    cache: dict = field(default_factory=dict, repr=False)   # per-step tensors the LoRA layers share

    @classmethod
    def from_token_slots(cls, token_slots: torch.Tensor) -> "LoRABatch":
        return cls(token_slots, bool((token_slots >= 0).any()))


@dataclass
class ForwardContext:
    attn: object | None = None              # engine.attention_metadata.AttentionMetadata for paged runs
    lora: LoRABatch | None = None


_CONTEXT = ForwardContext()


def get_context() -> ForwardContext:
    return _CONTEXT


@contextmanager
def forward_context(ctx: ForwardContext):
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = prev
