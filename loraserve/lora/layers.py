"""What an adapter computes: slot-indexed multi-LoRA versions of nn.Linear and nn.Embedding.

Each layer wraps the base module and holds every resident adapter's weights in stacked per-slot
buffers. The packed batch says, per token, which slot applies (`get_context().lora`). The base module
runs on all tokens exactly as without LoRA; then only the rows with a slot are recomputed and written
back, so base rows are bit-identical to the base model whatever shares the batch.

All slots are handled in one shot (no Python per token or per slot): h = x A_all^T gives every
slot's down-projection; a one-hot mask (carrying each row's scaling) keeps only the row's own slot;
one matmul with the stacked B^T finishes the delta. Zeros from other slots add exactly nothing, so a
row's value does not depend on the other rows' adapters. The cost grows with max_loras * rank, which
is small next to the base matmul at serving sizes.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from loraserve.engine.context import LoRABatch, get_context
from loraserve.lora.adapter import ModuleDelta


class _MultiLoRA(nn.Module):
    """Shared slot bookkeeping. Subclasses define `in_dim` (A's input size) and `out_dim`."""

    def __init__(self, base: nn.Module, max_loras: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.base_layer = base
        self.max_loras = max_loras
        w = base.weight
        # Buffers are not persistent: the model's state dict stays the base model's.
        self.register_buffer("lora_a", w.new_zeros(max_loras, 0, in_dim), persistent=False)
        self.register_buffer("lora_bt", w.new_zeros(max_loras, 0, out_dim), persistent=False)
        self.register_buffer("scaling", w.new_zeros(max_loras), persistent=False)
        self.register_buffer("token_pos", None, persistent=False)     # [L, in] embedding only
        self.register_buffer("token_values", None, persistent=False)  # [L, n, dim] embedding only
        # Per-adapter full copies (modules_to_save) and, for a tied lm_head, trainable-token columns.
        self.full: dict[int, dict[str, torch.Tensor]] = {}
        self.token_cols: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.slots_used: set[int] = set()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _grow_rank(self, rank: int) -> None:
        """Zero-pad the stacked buffers to `rank`: lower-rank adapters are padded with zeros."""
        if rank <= self.lora_a.shape[1]:
            return
        pad = rank - self.lora_a.shape[1]
        self.lora_a = F.pad(self.lora_a, (0, 0, 0, pad))
        self.lora_bt = F.pad(self.lora_bt, (0, 0, 0, pad))

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        self.scaling[slot] = 0
        self.full.pop(slot, None)
        self.token_cols.pop(slot, None)
        if self.token_pos is not None:
            self.token_pos[slot] = -1
        self.slots_used.discard(slot)

    def set_slot(self, slot: int, delta: ModuleDelta | None) -> None:
        """Put one adapter's change to this module in `slot` (None: the adapter leaves it unchanged)."""
        self.clear_slot(slot)
        if delta is None:
            return
        dev, dt = self.weight.device, self.weight.dtype
        if delta.lora_a is not None:
            self._grow_rank(delta.rank)
            self.lora_a[slot, : delta.rank] = delta.lora_a.to(dev, dt)
            self.lora_bt[slot, : delta.rank] = delta.lora_b.t().to(dev, dt)
            self.scaling[slot] = delta.scaling
        if delta.full_weight is not None:
            self.full[slot] = {"weight": delta.full_weight.to(dev, dt)}
            if delta.full_bias is not None:
                self.full[slot]["bias"] = delta.full_bias.to(dev, dt)
        self.slots_used.add(slot)

    def _lora_delta(self, a_rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Scaled B(A x) for each row under its own slot; `a_rows` is [N, L, r], A already applied."""
        n, L, r = a_rows.shape
        mask = torch.zeros(n, L, dtype=a_rows.dtype, device=a_rows.device)
        mask.scatter_(1, slots[:, None], self.scaling[slots][:, None])
        return (a_rows * mask[:, :, None]).reshape(n, L * r) @ self.lora_bt.reshape(L * r, -1)

    def _replace_full(self, new: torch.Tensor, inp: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows of slots holding a full module copy (modules_to_save) take that copy's output."""
        for slot, params in self.full.items():
            out = functional_call(self.base_layer, params, (inp,))
            new = torch.where((slots == slot)[:, None], out, new)
        return new

    def _batch(self, t: torch.Tensor) -> LoRABatch | None:
        lora = get_context().lora
        if lora is None or not lora.any_lora or not self.slots_used:
            return None
        if t.numel() != lora.token_slots.numel():
            raise RuntimeError(f"multi-LoRA layer got {t.numel()} tokens but the batch has "
                               f"{lora.token_slots.numel()} token slots")
        return lora


class MultiLoRALinear(_MultiLoRA):
    """nn.Linear plus per-slot LoRA (incl. DoRA, lora_bias, bias replacement, full copies)."""

    def __init__(self, base: nn.Linear, max_loras: int) -> None:
        super().__init__(base, max_loras, base.in_features, base.out_features)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("bias_delta", None, persistent=False)  # [L, out]
        self.register_buffer("dora_scale", None, persistent=False)  # [L, out]
        self.register_buffer("is_dora", None, persistent=False)     # [L] bool

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def clear_slot(self, slot: int) -> None:
        super().clear_slot(slot)
        if self.bias_delta is not None:
            self.bias_delta[slot].zero_()
        if self.is_dora is not None:
            self.is_dora[slot] = False

    def set_slot(self, slot: int, delta: ModuleDelta | None) -> None:
        super().set_slot(slot, delta)
        if delta is None:
            return
        dev, dt = self.weight.device, self.weight.dtype
        bias = torch.zeros(self.out_features, device=dev, dtype=dt)
        if delta.lora_bias is not None:
            bias += delta.lora_bias.to(dev, dt) * delta.scaling
        if delta.bias is not None:
            bias += delta.bias.to(dev, dt) - self.base_layer.bias
        if bias.any():
            if self.bias_delta is None:
                self.bias_delta = self.weight.new_zeros(self.max_loras, self.out_features)
            self.bias_delta[slot] = bias
        if delta.magnitude is not None:
            if self.dora_scale is None:
                self.dora_scale = self.weight.new_ones(self.max_loras, self.out_features)
                self.is_dora = torch.zeros(self.max_loras, dtype=torch.bool, device=dev)
            # DoRA: ||W + s B A|| per output row, a constant at inference (PEFT detaches it too).
            a, b = delta.lora_a.to(dev, dt), delta.lora_b.to(dev, dt)
            norm = torch.linalg.norm(self.weight + delta.scaling * (b @ a), dim=1)
            self.dora_scale[slot] = delta.magnitude.to(dev, dt) / norm
            self.is_dora[slot] = True
        if delta.token_indices is not None:  # tied lm_head: trainable tokens replace output columns
            self.token_cols[slot] = (delta.token_indices.to(dev), delta.token_values.to(dev, dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        lora = self._batch(x[..., 0])
        if lora is None:
            return y
        rows, slots = lora.rows, lora.slots
        xs = x.reshape(-1, self.in_features)[rows]
        y2 = y.view(-1, self.out_features)
        base_rows = y2[rows]
        L, r = self.lora_a.shape[:2]
        new = base_rows
        d = self._lora_delta(F.linear(xs, self.lora_a.reshape(L * r, -1)).view(-1, L, r), slots) if r else None
        if self.bias_delta is not None:  # bias="all" may change the bias of modules without LoRA
            d = self.bias_delta[slots] if d is None else d + self.bias_delta[slots]
        if d is not None:
            new = base_rows + d
            if self.is_dora is not None:
                # DoRA: g * (W x + s B A x) + bias, with g = magnitude / ||W + s B A||.
                g = self.dora_scale[slots]
                b = self.bias if self.bias is not None else 0
                new = torch.where(self.is_dora[slots][:, None], g * (base_rows - b + d) + b, new)
        new = self._replace_full(new, xs, slots)
        for slot, (cols, values) in self.token_cols.items():
            new[:, cols] = torch.where((slots == slot)[:, None], xs @ values.t(), new[:, cols])
        y2.index_copy_(0, rows, new)
        return y


class MultiLoRAEmbedding(_MultiLoRA):
    """nn.Embedding (incl. scaled embeddings such as Gemma's) plus per-slot LoRA, full copies and
    trainable-token rows. The base forward runs unchanged, so its own scaling stays exact."""

    def __init__(self, base: nn.Embedding, max_loras: int) -> None:
        super().__init__(base, max_loras, base.num_embeddings, base.embedding_dim)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim

    def set_slot(self, slot: int, delta: ModuleDelta | None) -> None:
        super().set_slot(slot, delta)
        if delta is None or delta.token_indices is None:
            return
        n = delta.token_indices.numel()
        if self.token_pos is None:
            self.token_pos = torch.full((self.max_loras, self.num_embeddings), -1, dtype=torch.long,
                                        device=self.weight.device)
        if self.token_values is None or self.token_values.shape[1] < n:
            old = self.token_values
            self.token_values = self.weight.new_zeros(self.max_loras, n, self.embedding_dim)
            if old is not None:
                self.token_values[:, : old.shape[1]] = old
        self.token_pos[slot, delta.token_indices.to(self.weight.device)] = torch.arange(n, device=self.weight.device)
        self.token_values[slot, :n] = delta.token_values.to(self.weight.device, self.weight.dtype)

    def _scale(self, t: torch.Tensor) -> torch.Tensor:
        """Scaled embeddings (Gemma) multiply their output; PEFT scales the adapter's part the same way."""
        scale = getattr(self.base_layer, "embed_scale", None)
        return t if scale is None else t * scale.to(t.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        lora = self._batch(ids)
        if lora is None:
            return y
        rows, slots = lora.rows, lora.slots
        ids_r = ids.reshape(-1)[rows]
        y2 = y.view(-1, self.embedding_dim)
        new = y2[rows]
        L, r = self.lora_a.shape[:2]
        if r > 0:
            a_rows = self.lora_a.permute(0, 2, 1)[:, ids_r].permute(1, 0, 2)  # [N, L, r]
            new = new + self._scale(self._lora_delta(a_rows, slots))
        new = self._replace_full(new, ids_r, slots)
        if self.token_pos is not None:
            pos = self.token_pos[slots, ids_r]
            replaced = self._scale(self.token_values[slots, pos.clamp(min=0)])
            new = torch.where((pos >= 0)[:, None], replaced, new)
        y2.index_copy_(0, rows, new)
        return y
