"""Attention over the paged KV cache, plugged into unmodified transformers models.

transformers computes q/k/v (with RoPE, norms, Gemma's per-layer quirks) and then calls the
function registered under the model's `_attn_implementation`. We register `paged_attention`: it
writes this step's K/V into the cache and attends each query token over its own sequence's
cached context. The whole batch is one packed "sequence" of T tokens ([1, T] input_ids), so the
model's own mask building is switched off (our mask function returns None) and the per-sequence
structure comes from AttentionMetadata, built once per step by the runner.

On CPU every query token of the step, decodes and prompt chunks alike, goes to one C++ kernel call per
layer that reads K/V in place from the cache's blocks (csrc/paged_attention.cpp, built by kernels.py):
each token attends over its own context, given by its sequence's block table and its own position. Other
devices and machines without a compiler use the PyTorch path below, group by group: gather the blocks,
then batched matmuls. (Prompt chunks went that way on CPU too until session 9: a 512-token prefill step of
SmolLM2 spent 36 of its 166 ms in it; 10-12 ms through the kernel with the helper thread.)"""

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from loraserve.engine.context import get_context
from loraserve.engine.kv_cache import KVCache

ATTN_NAME = "loraserve_paged"


@dataclass
class AttentionGroup:
    """Sequences attended together: each has q_len query tokens; keys are padded to kv_len."""
    rows: torch.Tensor        # [B, q_len] token indices into the packed batch
    q_pos: torch.Tensor       # [B, q_len] position of each query token
    kv_blocks: torch.Tensor   # [B, nb] KV blocks of each sequence's context (padding: block 0)
    kv_pos: torch.Tensor      # [B, nb * block_size] position of each key; padding has a huge position
    span: slice | None = None  # the same rows as a slice, when they are consecutive (always, as scheduled)
    masks: dict = field(default_factory=dict)   # sliding window -> [B, 1, q_len, kv_len] bool

    def blocked(self, window: int | None) -> torch.Tensor:
        """Keys each query must not see; built once per step and window, shared by every layer."""
        if window not in self.masks:
            q, k = self.q_pos[:, :, None], self.kv_pos[:, None, :]
            allowed = k <= q                    # causal (padding keys sit past every query)
            if window is not None:
                allowed &= k > q - window       # transformers' sliding-window rule
            self.masks[window] = ~allowed[:, None]
        return self.masks[window]


@dataclass
class AttentionMetadata:
    kv_cache: KVCache
    slot_mapping: torch.Tensor                  # [T] cache slot of each new token
    groups: list[AttentionGroup]
    decode_kernel: object | None = None         # model/kernels.py's compiled module (CPU), or None
    # For the kernel: each query token's block table (its sequence's) [T, nb] and context length (its
    # position + 1) [T]. Set by the runner where there is a kernel.
    query_tables: torch.Tensor | None = None
    query_lens: torch.Tensor | None = None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor, scaling: float | None,
            softcap: float | None) -> torch.Tensor:
    """q [Hkv, B, G * q_len, D] (the G query heads of each KV head folded into the query axis), k/v
    [Hkv, B, L, D], blocked [B, 1, q_len, L] -> [Hkv, B, G * q_len, D].

    Plain batched matmuls rather than SDPA: on CPU, bf16 SDPA with a mask and GQA is ~50x slower than
    this for decode shapes (measured: 4.8 ms vs 0.09 ms for 16 x 9 heads x 128 keys). Folding the query
    heads means no K/V copy is made for GQA. Softmax runs in float32."""
    hkv, b, gn, d = q.shape
    n = blocked.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (scaling if scaling is not None else d ** -0.5)
    if softcap is not None:   # Gemma 2's attention logit soft-capping
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(hkv, b, gn // n, n, -1).masked_fill(blocked[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(hkv, b, gn, -1)
    return torch.matmul(probs, v)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[Hkv, B, nb * block_size, D] keys (or values) of `blocks` [B, nb] from a [Hkv, slots, D] cache:
    whole blocks are gathered (contiguous block_size x D chunks), and the result is contiguous per
    (head, sequence), so the matmuls read it without a transposing copy. index_select, not advanced
    indexing: it copies whole chunks and was 4x faster for a batch-16 decode."""
    hkv, _, d = cache.shape
    b, nb = blocks.shape
    return cache.view(hkv, -1, block_size, d).index_select(1, blocks.view(-1)).view(hkv, b, nb * block_size, d)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor) -> None:
    """key/value [T, Hkv, D] go to cache slots `slots` [T] of the [Hkv, slots, D] caches."""
    k_cache.index_copy_(1, slots, key.transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, slots, value.transpose(0, 1).to(v_cache.dtype))


def write_kv(md: AttentionMetadata, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """key/value [T, Hkv, D] of this step's tokens go to their slots of the layer's caches (a layer that
    reads another layer's cache, Gemma's KV sharing, writes nothing)."""
    k_cache, v_cache, owns = md.kv_cache.layer(layer_idx)
    if owns:
        store_kv(k_cache, v_cache, md.slot_mapping, key, value)


def attend(md: AttentionMetadata, layer_idx: int, query: torch.Tensor, scaling: float | None,
           sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    """query [T, H, D] (any strides) -> [T, H, D]: each token attends over its own sequence's cached
    context, the step's own keys included (write_kv first)."""
    k_cache, v_cache, _ = md.kv_cache.layer(layer_idx)
    t, h, d = query.shape
    bs = md.kv_cache.block_size
    if md.query_tables is not None and query.dtype == k_cache.dtype:
        # Every query token over its own context: the C++ kernel reads K/V in place from the cache's blocks.
        return md.decode_kernel.paged_decode_attention(
            query.contiguous(), k_cache, v_cache, md.query_tables, md.query_lens, bs,
            scaling if scaling is not None else d ** -0.5, softcap or 0.0, sliding_window or 0)
    hkv = k_cache.shape[0]
    q = query.transpose(0, 1).view(hkv, h // hkv, t, d)                # [Hkv, G, T, D]
    out = None
    for g in md.groups:
        b, n = g.rows.shape
        rows = g.rows if g.span is None else g.span                     # a slice reads a view, not a gather
        qg = q[:, :, rows].reshape(hkv, h // hkv, b, n, d).transpose(1, 2).reshape(hkv, b, -1, d)
        kg, vg = _gather(k_cache, g.kv_blocks, bs), _gather(v_cache, g.kv_blocks, bs)
        o = _attend(qg, kg, vg, g.blocked(sliding_window), scaling, softcap)   # [Hkv, B, G * q_len, D]
        o = o.view(hkv, b, h // hkv, n, d).permute(1, 3, 0, 2, 4).reshape(b * n, h, d)
        if g.span == slice(0, t):       # one group holds the whole batch (a pure decode step)
            return o
        if out is None:
            out = query.new_empty(t, h, d)
        out[rows] = o.view(b, n, h, d) if g.span is None else o
    return out


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention interface: query [1, H, T, D], key/value [1, Hkv, T, D] -> [1, T, H, D]."""
    md: AttentionMetadata = get_context().attn
    write_kv(md, module.layer_idx, key[0].transpose(0, 1), value[0].transpose(0, 1))
    out = attend(md, module.layer_idx, query[0].transpose(0, 1), scaling, sliding_window, softcap)
    return out.unsqueeze(0), None                                       # like sdpa


def _no_mask(*args, **kwargs):
    return None


AttentionInterface.register(ATTN_NAME, paged_attention)
AttentionMaskInterface.register(ATTN_NAME, _no_mask)
