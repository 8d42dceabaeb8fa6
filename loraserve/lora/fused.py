"""Projection groups: q/k/v (and gate/up) read the same input, so run them as one GEMM.

On a CPU at decode batch sizes a small GEMM costs ~15-25 us of fixed overhead whatever its size, so
the number of GEMMs, not their FLOPs, sets much of the price of LoRA (measured on 2 cores, SmolLM2,
batch 16: 14 extra GEMMs per layer made a mixed-adapter step ~1.5x a base step). A group stacks its
members' base weights and every slot's LoRA A into one matrix, so one GEMM gives the base outputs and
all down-projections; then one GEMM per member, with its stack of every slot's scaling * B, adds each
row's own delta. Per layer that is 4 + 7 GEMMs instead of 7 + 14 (o_proj and down_proj are groups of
one: their A still rides on their base GEMM). A single block-diagonal B per group would save calls but
read its zero blocks too: for gate/up the split was ~30% faster on 2 cores. On CPU bf16 the stacks are
prepacked for oneDNN (model/cpu_gemm.py); after an adapter enters or leaves a slot they run unpacked
for a few steps and are repacked once the slots have settled.

Each output column of a GEMM is its own dot product, so the base columns come out bit-identical to
the members' separate GEMMs (the isolation tests check it); base rows get a zero mask and so + 0.
Groups fall back to the members' own forward when any member carries more than plain LoRA in some
slot (DoRA, bias changes, full copies, trainable tokens)."""

import torch
from torch import nn

from loraserve.lora.layers import MultiLoRALinear
from loraserve.model.cpu_gemm import PackedLinear, PackedWeight
from loraserve.model.fused_linear import SIBLINGS, SiblingGroup, stack_rows

# Singletons too: stacking a projection's own A under its base weight saves one GEMM per layer.
GROUPS = SIBLINGS + (("o_proj",), ("down_proj",))
SETTLE_CALLS = 8    # forwards on the plain stacks after a slot change before they are packed again


class ProjectionGroup(SiblingGroup):
    def __init__(self, members: list[MultiLoRALinear]) -> None:
        super().__init__(members)
        self.outs = [m.out_features for m in members]
        self.synced: tuple[int, ...] | None = None        # members' slot versions when last synced
        self.w_cat: torch.Tensor | None = None            # [O + G*L*r, in]: base weights, then each A
        self.b_cat: torch.Tensor | None = None
        self.b_members: list[torch.Tensor] = []           # per member [O_g, L*r]: every slot's scaling * B
        # oneDNN copies (CPU bf16, see cpu_gemm.py), packed once the slots have been stable for a while.
        self.packed_w = PackedWeight(SETTLE_CALLS)
        self.packed_b = [PackedWeight(SETTLE_CALLS) for _ in members]
        self.rank = 0
        for m in members:
            m.group = self

    def plain(self) -> bool:
        return all(m.bias_delta is None and m.is_dora is None and not m.full and not m.token_cols
                   for m in self.members)

    def _sync(self) -> None:
        """Rebuild the stacked weights after a slot of any member changed (rare: adapter placement)."""
        versions = tuple(m.slot_version for m in self.members)
        if versions == self.synced:
            return
        rank = max(m.lora_a.shape[1] for m in self.members)
        for m in self.members:
            m._grow_rank(rank)                            # zero padding: exact
        first = self.members[0]
        L, in_dim, out = first.max_loras, first.in_features, sum(self.outs)
        if self.w_cat is None or rank != self.rank:
            # Base weights, then zero rows for every slot's A; the base weights become views of the stack.
            self.w_cat, self.b_cat = stack_rows([m.base_layer for m in self.members], len(self.members) * L * rank)
            for m in self.members:
                if isinstance(m.base_layer, PackedLinear):   # drop the packed copy of the old weight
                    m.base_layer.packed_weight = PackedWeight()
            self.b_members = [self.w_cat.new_zeros(o, L * rank) for o in self.outs]
            self.rank = rank
        for g, (m, o) in enumerate(zip(self.members, self.outs)):
            rows = slice(out + g * L * rank, out + (g + 1) * L * rank)
            self.w_cat[rows] = m.lora_a.reshape(L * rank, in_dim)
            self.b_members[g].copy_(m.lora_bt.reshape(L * rank, o).t())
        self.synced = versions

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode(False):   # the stacks outlive this forward: make normal tensors
            self._sync()
        first = self.members[0]
        x2 = x.reshape(-1, first.in_features)
        y = self.packed_w.linear(x2, self.w_cat, self.b_cat)
        out_dim = sum(self.outs)
        used = [m for m in self.members if m.slots_used]
        rows = used[0]._slot_rows(x2.shape[0]) if used else None
        shape = x.shape[:-1]
        if rows is None or self.rank == 0:
            return [o.contiguous().view(*shape, -1) for o in y[:, :out_dim].split(self.outs, dim=1)]
        G, L, r = len(self.members), first.max_loras, self.rank
        h = (y[:, out_dim:].view(-1, G, L, r) * rows.mask(L, y.dtype)[:, None, :, None]).view(-1, G, L * r)
        outs, col = [], 0
        for g, o in enumerate(self.outs):
            # Base rows have an all-zero h, so their delta is exactly 0 and they stay bit-identical.
            outs.append(self.packed_b[g].add_linear(y[:, col:col + o], h[:, g], self.b_members[g]))
            col += o
        return [o.view(*shape, -1) for o in outs]


def link_projection_groups(model: nn.Module) -> list[ProjectionGroup]:
    """Group sibling projections that read the same input (same parent, known names, same in_features);
    o_proj and down_proj form groups of one."""
    groups = []
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, MultiLoRALinear)]
            if members and len({m.in_features for m in members}) == 1:
                groups.append(ProjectionGroup(members))
    return groups
