"""Paged KV cache: fixed-size blocks in one flat buffer per layer, handed out by a block manager.

Memory grows with tokens in use: a sequence holds ceil(len / block_size) blocks, freed the moment it
finishes or is aborted. K/V are stored heads-first as [kv_heads, num_blocks * block_size, head_dim]: a
token's cache slot is block * block_size + offset, and gathering a batch's blocks yields
[kv_heads, batch, tokens, head_dim] already laid out for the attention matmuls (no transposing copy)."""

from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from loraserve.engine.sequence import Sequence


@dataclass
class LayerCacheSpec:
    layer_idx: int
    num_kv_heads: int
    head_dim: int
    source_layer: int          # Gemma 4 KV-shared layers read another layer's cache and write none


def cache_specs(model: nn.Module) -> dict[int, LayerCacheSpec]:
    """Find each attention layer's K/V shape (it may vary per layer, as in Gemma 4)."""
    specs: dict[int, LayerCacheSpec] = {}
    last_store: dict[object, int] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is None or not hasattr(module, "o_proj") or not hasattr(module, "head_dim"):
            continue
        if getattr(module, "is_kv_shared_layer", False):
            src = last_store[module.layer_type]
            specs[idx] = LayerCacheSpec(idx, specs[src].num_kv_heads, specs[src].head_dim, src)
            continue
        kv_heads = module.k_proj.out_features // module.head_dim
        specs[idx] = LayerCacheSpec(idx, kv_heads, module.head_dim, idx)
        if getattr(module, "store_full_length_kv", False):
            last_store[module.layer_type] = idx
    return specs


class KVCache:
    """The K/V buffers of every layer that owns a cache."""

    def __init__(self, specs: dict[int, LayerCacheSpec], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.specs = specs
        self.num_blocks, self.block_size = num_blocks, block_size
        n = num_blocks * block_size
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for s in specs.values():
            if s.source_layer == s.layer_idx:
                self.k[s.layer_idx] = torch.zeros(s.num_kv_heads, n, s.head_dim, dtype=dtype, device=device)
                self.v[s.layer_idx] = torch.zeros(s.num_kv_heads, n, s.head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(specs: dict[int, LayerCacheSpec], dtype: torch.dtype) -> int:
        elt = torch.tensor([], dtype=dtype).element_size()
        return sum(2 * s.num_kv_heads * s.head_dim * elt for s in specs.values() if s.source_layer == s.layer_idx)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(k, v, owns): `owns` is False for a layer that reads another layer's cache."""
        src = self.specs[layer_idx].source_layer
        return self.k[src], self.v[src], src == layer_idx


class BlockManager:
    """Hands out KV blocks; a sequence's block table maps its token positions to cache slots."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold its first `num_tokens` tokens."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
