"""What an adapter computes: slot-indexed multi-LoRA versions of nn.Linear and nn.Embedding.

Each layer wraps the base module and holds every resident adapter's weights in stacked per-slot
buffers. The packed batch says, per token, which slot applies (`get_context().lora`). The base module
runs on all tokens exactly as without LoRA; adapter rows are then replaced by `torch.where`, so base
rows are the base output bit for bit whatever shares the batch.

All slots are handled in one shot (no Python per token, static shapes): h = x A_all^T gives every
slot's down-projection; a one-hot mask (zero for base rows, built once per step and shared by every
layer) keeps only the row's own slot; one matmul with the stacked (scaling * B)^T finishes the delta.
Zeros from other slots add exactly nothing. The matmuls run over all T tokens, not just the adapter
rows, on purpose: a GEMM's per-row result can change with its row count, so computing over a subset
whose size depends on the other requests would make a row's value depend on them. The cost grows
with max_loras * rank, small next to the base matmul at serving sizes.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from loraserve.engine.context import get_context
from loraserve.lora.adapter import ModuleDelta


class SlotRows:
    """Per-token slot tensors derived once per step (and per token subset) and shared by all layers."""

    def __init__(self, token_slots: torch.Tensor) -> None:
        self.token_slots = token_slots
        self.on = token_slots >= 0
        self.slots = token_slots.clamp(min=0)
        self._masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def mask(self, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, num_slots] one-hot of each row's slot; all zero for base rows."""
        key = (num_slots, dtype)
        if key not in self._masks:
            m = torch.zeros(self.slots.numel(), num_slots, dtype=dtype, device=self.slots.device)
            self._masks[key] = m.scatter_(1, self.slots[:, None], self.on[:, None].to(dtype))
        return self._masks[key]


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
        self.register_buffer("token_pos", None, persistent=False)     # [L, in] embedding only
        self.register_buffer("token_values", None, persistent=False)  # [L, n, dim] embedding only
        # Per-adapter full copies (modules_to_save) and, for a tied lm_head, trainable-token columns.
        self.full: dict[int, dict[str, torch.Tensor]] = {}
        self.token_cols: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.slots_used: set[int] = set()
        # Which of the batch's tokens this module sees, when not all: the output head under
        # `logits_to_keep` (set by LoRAManager's hook on the model's forward).
        self.token_index: torch.Tensor | None = None

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
        self.full.pop(slot, None)
        self.token_cols.pop(slot, None)
        if self.token_pos is not None:
            self.token_pos[slot] = -1
        self.slots_used.discard(slot)
        self._slots_changed(slot)

    def set_slot(self, slot: int, delta: ModuleDelta | None) -> None:
        """Put one adapter's change to this module in `slot` (None: the adapter leaves it unchanged)."""
        self.clear_slot(slot)
        if delta is None:
            return
        dev, dt = self.weight.device, self.weight.dtype
        if delta.lora_a is not None:
            self._grow_rank(delta.rank)
            self.lora_a[slot, : delta.rank] = delta.lora_a.to(dev, dt)
            # The scaling is folded into B: one multiply fewer per token, per layer.
            self.lora_bt[slot, : delta.rank] = (delta.lora_b * delta.scaling).t().to(dev, dt)
        if delta.full_weight is not None:
            self.full[slot] = {"weight": delta.full_weight.to(dev, dt)}
            if delta.full_bias is not None:
                self.full[slot]["bias"] = delta.full_bias.to(dev, dt)
        self.slots_used.add(slot)
        self._slots_changed(slot)

    def _slots_changed(self, slot: int) -> None:
        group = getattr(self, "group", None)
        if group is not None:       # a fused.ProjectionGroup rebuilds its stacks before the next forward
            group.stale = True
            group.changed_slots.add(slot)

    def _lora_delta(self, a_rows: torch.Tensor, rows: SlotRows) -> torch.Tensor:
        """Scaled B(A x) for each row under its own slot (zero for base rows); `a_rows` [T, L, r] is A x
        under every slot."""
        t, L, r = a_rows.shape
        masked = a_rows * rows.mask(L, a_rows.dtype)[:, :, None]
        return masked.reshape(t, L * r) @ self.lora_bt.reshape(L * r, -1)

    def _replace_full(self, new: torch.Tensor, inp: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        """Rows of slots holding a full module copy (modules_to_save) take that copy's output."""
        for slot, params in self.full.items():
            out = functional_call(self.base_layer, params, (inp,))
            new = torch.where((token_slots == slot)[:, None], out, new)
        return new

    def _slot_rows(self, n_tokens: int) -> SlotRows | None:
        """This call's per-token slots, or None when the base output is the answer."""
        lora = get_context().lora
        if lora is None or not lora.any_lora or not self.slots_used:
            return None
        key = None if self.token_index is None else id(self.token_index)
        rows = lora.cache.get(key)
        if rows is None:
            token_slots = lora.token_slots if self.token_index is None else lora.token_slots[self.token_index]
            rows = lora.cache[key] = SlotRows(token_slots)
        if n_tokens != rows.token_slots.numel():
            raise RuntimeError(f"multi-LoRA layer got {n_tokens} tokens but the batch has "
                               f"{rows.token_slots.numel()} token slots")
        return rows


class MultiLoRALinear(_MultiLoRA):
    """nn.Linear plus per-slot LoRA (incl. DoRA, lora_bias, bias replacement, full copies)."""

    def __init__(self, base: nn.Linear, max_loras: int) -> None:
        super().__init__(base, max_loras, base.in_features, base.out_features)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("bias_delta", None, persistent=False)  # [L, out]
        self.register_buffer("dora_scale", None, persistent=False)  # [L, out]
        self.register_buffer("is_dora", None, persistent=False)     # [L] bool
        self.group = None   # a fused.ProjectionGroup when q/k/v or gate/up run as one GEMM

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
        if self.group is not None and self.group.plain():
            return self.group.forward(self, x)
        y = self.base_layer(x)
        rows = self._slot_rows(x[..., 0].numel())
        if rows is None:
            return y
        token_slots, on, slots = rows.token_slots, rows.on, rows.slots
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        L, r = self.lora_a.shape[:2]
        h = F.linear(x2, self.lora_a.reshape(L * r, -1)) if r else None
        if h is not None and self.bias_delta is None and self.is_dora is None and not self.full \
                and not self.token_cols:
            # Plain LoRA, the hot path: base rows have an all-zero mask, so they get exactly + 0.
            h = (h.view(-1, L, r) * rows.mask(L, h.dtype)[:, :, None]).view(-1, L * r)
            return torch.addmm(y2, h, self.lora_bt.reshape(L * r, -1)).view_as(y)
        d = self._lora_delta(h.view(-1, L, r), rows) if r else None
        if self.bias_delta is not None:  # bias="all" may change the bias of modules without LoRA
            d = self.bias_delta[slots] if d is None else d + self.bias_delta[slots]
        new = y2 if d is None else y2 + d
        if self.is_dora is not None:
            # DoRA: g * (W x + s B A x) + bias, with g = magnitude / ||W + s B A||.
            g = self.dora_scale[slots]
            b = self.bias if self.bias is not None else 0
            new = torch.where(self.is_dora[slots][:, None], g * (y2 - b + d) + b, new)
        new = self._replace_full(new, x2, token_slots)
        for slot, (cols, values) in self.token_cols.items():
            new = new.clone() if new is y2 else new
            new[:, cols] = torch.where((token_slots == slot)[:, None], x2 @ values.t(), new[:, cols])
        return torch.where(on[:, None], new, y2).view_as(y)


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
        rows = self._slot_rows(ids.numel())
        if rows is None:
            return y
        token_slots, on, slots = rows.token_slots, rows.on, rows.slots
        ids2, y2 = ids.reshape(-1), y.reshape(-1, self.embedding_dim)
        new = y2
        L, r = self.lora_a.shape[:2]
        if r:
            a_rows = self.lora_a.permute(0, 2, 1)[:, ids2].permute(1, 0, 2)  # [T, L, r]: A's column per token
            new = y2 + self._scale(self._lora_delta(a_rows, rows))
        new = self._replace_full(new, ids2, token_slots)
        if self.token_pos is not None:
            pos = self.token_pos[slots, ids2]
            replaced = self._scale(self.token_values[slots, pos.clamp(min=0)])
            new = torch.where((pos >= 0)[:, None], replaced, new)
        return torch.where(on[:, None], new, y2).view_as(y)
