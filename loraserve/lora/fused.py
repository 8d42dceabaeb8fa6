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

Each output column of a GEMM is its own dot product, so on CPU the base columns come out bit-identical
to the members' separate GEMMs (the isolation tests check it); base rows get a zero mask and so + 0.
On CUDA cuBLAS picks its kernel by the matrices' shapes and stacked columns may differ in the last bits
(seen on an H200, model/fused_linear.py): there each member keeps its own base GEMM, and only the
members' A stacks share one GEMM, beside it.
Groups fall back to the members' own forward when any member carries more than plain LoRA in some
slot (DoRA, bias changes, full copies, trainable tokens).

With the C++ multi-LoRA kernel (CPU, model/csrc/multi_lora.cpp) a group stacks only the base weights,
once, when the engine starts (packed at once: they never change): one GEMM for the base outputs, then
one kernel call applies each row's own adapter and nothing else, reading the members' slot buffers in
place. Per layer that is 4 GEMMs + 4 kernel calls, and the LoRA work is ~5% of the base FLOPs instead
of ~37% (8 slots of rank 16). That work is bound by reading the adapters (78 MB a step for 8 SmolLM2
adapters), the base GEMM by arithmetic: with one engine thread on a machine of 2+ cores (the serving
default) the kernels' helper thread (model/csrc/helper_thread.h) computes the deltas while this thread
runs the base GEMM, and this thread takes over whatever chunks the helper has not reached when its GEMM
is done (the helper shares its core with the HTTP server). The deltas are added with the same one
rounding: the same bits. Prompt chunks (more than BESIDE_MAX_ROWS rows) take the in-place apply after
the GEMM instead, its blocks shared with the helper: with 64 rows an adapter the deltas are arithmetic
too, so running them beside the GEMM hides nothing, and the float32 buffer of the deferred add (6 MB for
gate/up at 512 rows) only costs memory traffic (a 512-token prefill step with 8 adapters 386 -> 363 ms,
base ~355 ms; a 2-core Zen 4, bench/README.md session 15)."""

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.engine.context import get_context
from loraserve.lora.layers import MultiLoRALinear
from loraserve.model.arena import HugePageArena
from loraserve.model.cpu_gemm import PackedLinear, PackedWeight, gemm_kernel
from loraserve.model.fused_linear import SIBLINGS, SiblingGroup, stack_rows, stacks_bit_exactly

# Singletons too: stacking a projection's own A under its base weight saves one GEMM per layer.
GROUPS = SIBLINGS + (("o_proj",), ("down_proj",))
SETTLE_CALLS = 8    # forwards on the plain stacks after a slot change before they are packed again
BESIDE_MAX_ROWS = 64  # more rows (prompt chunks): the deltas after the GEMM, in place (see _compute)
KERNEL_TILE = 16    # output columns per B tile: the C++ kernel's vector width (W in csrc/multi_lora.cpp)


class ProjectionGroup(SiblingGroup):
    def __init__(self, members: list[MultiLoRALinear], kernel: object | None = None,
                 arena: HugePageArena | None = None, deltas_beside: bool = False) -> None:
        super().__init__(members)
        self.kernel = kernel                              # kernels.multi_lora() or None
        self.deltas_beside = deltas_beside                # kernel path: deltas on its helper thread during the GEMM
        self.arena = arena                                # kernel path: where the A stacks and B tiles live
        self.outs = [m.out_features for m in members]
        self.stale = True                                 # a member's slot changed since the last _sync
        self.changed_slots: set[int] = set()              # which slots, since then
        self.is_plain = True
        # Whether the base weights join the stack (CPU) or each member keeps its own GEMM (CUDA: see above).
        self.stack_base = stacks_bit_exactly(members[0].base_layer.weight)
        self.w_cat: torch.Tensor | None = None            # [O (+ G*L*r), in]: base weights (then each A);
        #                                                   unstacked base: [G*L*r, in], the A's only
        self.b_cat: torch.Tensor | None = None
        # PyTorch path: per member [O_g, L*r], every slot's scaling * B.
        self.b_members: list[torch.Tensor] = []
        # Kernel path: the members with LoRA (their A, B tiles, first column and width) bound in C++;
        # each member's B tiles with the lora_bt they were cut from, and its A as moved into the arena.
        self.kernel_group: object | None = None
        self.next_group: ProjectionGroup | None = None    # the group the forward runs next (read ahead)
        self.b_tiles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.a_moved: dict[int, torch.Tensor] = {}
        # Packed copies (CPU bf16, see cpu_gemm.py), packed once the slots have been stable for a while.
        # With the kernel the stack holds base weights only, which never change: packed at once. The stack
        # runs on the GEMM its members were packed for, so base columns keep their bits stacked or alone.
        self.packed_w = PackedWeight(SETTLE_CALLS if kernel is None else 0, gemm_kernel(members[0].base_layer))
        self.packed_b = [PackedWeight(SETTLE_CALLS) for _ in members]
        self.rank = 0
        for m in members:
            m.group = self

    def prepare(self) -> None:
        """With the kernel, stack (and on CPU bf16 pack) the base weights now, at start-up, not inside the
        first requests: for SmolLM2 that is ~400 MB of fresh memory, which page-faulted its way into the
        first served steps (some took 0.4-0.6 s instead of 0.3 s on this VM, where a first touch of a page
        costs ~13 us). The PyTorch path's stack also holds every slot's A, so its size waits for the ranks."""
        if self.kernel is None:
            return
        self.plain()
        self.packed_w.prepack(self.w_cat)

    def plain(self) -> bool:
        """Whether every member carries plain LoRA only, so the group may run them (members call this
        on every forward: it is a flag, recomputed only after a slot change)."""
        if self.stale:
            with torch.inference_mode(False):   # the stacks outlive this forward: make normal tensors
                self._sync()
        return self.is_plain

    def _sync(self) -> None:
        """Rebuild the stacked weights after a slot of any member changed (rare: adapter placement)."""
        self.stale = False
        self.is_plain = all(m.bias_delta is None and m.is_dora is None and not m.full and not m.token_cols
                            for m in self.members)
        if self.kernel is not None:
            self._sync_kernel()
        else:
            self._sync_stacks()

    def _stack_base(self, extra_rows: int) -> None:
        # Base weights (then zero rows for every slot's A); the base weights become views of the stack.
        self.w_cat, self.b_cat = stack_rows([m.base_layer for m in self.members], extra_rows)
        for m in self.members:
            if isinstance(m.base_layer, PackedLinear):   # drop the packed copy of the old weight
                m.base_layer.packed_weight = PackedWeight(kernel=m.base_layer.packed_weight.kernel)

    def _sync_kernel(self) -> None:
        # The kernel reads each member's A in place and B as column tiles: only base weights are stacked.
        if self.w_cat is None:
            self._stack_base(0)
        # Members that had LoRA keep their buffers and tiles up to date even while no slot uses them, so
        # an adapter coming back finds them in place: buffers are cut again only when a higher rank arrives.
        for m in self.members:
            if m.lora_a.shape[1]:
                self._move_a(m)
                self._b_tiles(m)
        self.changed_slots.clear()
        cols = [sum(self.outs[:g]) for g in range(len(self.members))]
        lora = [(m, c) for m, c in zip(self.members, cols) if m.slots_used and m.lora_a.shape[1]]
        self.kernel_group = self.kernel.Group([m.lora_a for m, _ in lora], [self.b_tiles[id(m)][1] for m, _ in lora],
                                              [c for _, c in lora], [m.out_features for m, _ in lora]) if lora else None

    def _move_a(self, member: MultiLoRALinear) -> None:
        """Move `member`'s A stack into the arena (once per rank: later slot writes land there in place)."""
        if self.arena is not None and member.lora_a is not self.a_moved.get(id(member)):
            member.lora_a = self.a_moved[id(member)] = self.arena.copy(member.lora_a)

    def _b_tiles(self, member: MultiLoRALinear) -> None:
        """Cut `member`'s B into the kernel's column tiles: only the slots that changed are cut again, unless
        lora_bt itself was replaced (a higher rank arrived) or the member had no tiles yet."""
        source, tiles = self.b_tiles.get(id(member), (None, None))
        pairs = self.kernel.b_pairs(member.lora_bt)
        if source is not member.lora_bt:
            tiles = column_tiles(member.lora_bt, pairs)
            tiles = tiles if self.arena is None else self.arena.copy(tiles)
        else:
            for slot in self.changed_slots:
                tiles[slot] = column_tiles(member.lora_bt[slot:slot + 1], pairs)[0]
        self.b_tiles[id(member)] = (member.lora_bt, tiles)

    def _sync_stacks(self) -> None:
        rank = max(m.lora_a.shape[1] for m in self.members)
        for m in self.members:
            m._grow_rank(rank)                            # zero padding: exact
        first = self.members[0]
        L, in_dim, out = first.max_loras, first.in_features, sum(self.outs)
        if not self.stack_base:
            out = 0                                       # the stack holds the A's only
        if self.w_cat is None or rank != self.rank:
            if self.stack_base:
                self._stack_base(len(self.members) * L * rank)
            else:
                self.w_cat = first.lora_a.new_zeros(len(self.members) * L * rank, in_dim)
            self.b_members = [self.w_cat.new_zeros(o, L * rank) for o in self.outs]
            self.rank = rank
        for g, (m, o) in enumerate(zip(self.members, self.outs)):
            rows = slice(out + g * L * rank, out + (g + 1) * L * rank)
            self.w_cat[rows] = m.lora_a.reshape(L * rank, in_dim)
            self.b_members[g].copy_(m.lora_bt.reshape(L * rank, o).t())

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        return self._compute(x) if self.plain() else None   # not plain: each member runs its own forward

    def forward(self, member: MultiLoRALinear, x: torch.Tensor) -> torch.Tensor:
        if len(self.outs) == 1:             # o_proj, down_proj: nothing to keep for a sibling
            return self._compute(x)[0]
        return super().forward(member, x)

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.stale:
            self.plain()
        if self.kernel is not None:
            # x keeps the model's shape ([1, T, in]): the kernel flattens it in C++, cheaper than here.
            # The batch's token slots as they are: no per-step tensors derived from them here (small
            # allocations made mid-forward fragment the heap the large activations come from).
            lora = get_context().lora
            group = self.kernel_group if lora is not None and lora.any_lora else None
            # Beside: the helper thread computes each row's own delta (reading the adapters) while this
            # thread runs the base GEMM (arithmetic); finish adds them with apply's one rounding: the same bits.
            # The groups that run next and after it: the idle helper prefetches their adapters meanwhile.
            nxt, after = (self.next_group.kernel_group, self.next_group.next_group.kernel_group) \
                if self.next_group is not None else (None, None)
            beside = self.deltas_beside and x.shape[-2] <= BESIDE_MAX_ROWS
            started = group is not None and beside and group.start(x, lora.token_slots, nxt, after)
            y = self.packed_w.linear(x, self.w_cat, self.b_cat)
            if started:
                group.finish(y)
            elif group is not None:
                group.apply(x, lora.token_slots, y)      # y += each row's own delta, in place; base rows untouched
            # Column views, as FusedLinearGroup returns (o_proj, down_proj: y itself).
            return list(y.split_with_sizes(self.outs, dim=-1)) if len(self.outs) > 1 else [y]
        x2 = x.reshape(-1, self.members[0].in_features)
        shape = x.shape[:-1]
        used = [m for m in self.members if m.slots_used]
        rows = used[0]._slot_rows(x2.shape[0]) if used else None
        lora = rows is not None and self.rank > 0
        if self.stack_base:
            y = self.packed_w.linear(x2, self.w_cat, self.b_cat)
            out_dim = sum(self.outs)
            bases, down = list(y[:, :out_dim].split(self.outs, dim=1)), y[:, out_dim:]
        else:                                             # each member's own base GEMM, then the A's in one
            bases = [m.base_layer(x2) for m in self.members]
            down = self.packed_w.linear(x2, self.w_cat) if lora else None
        if not lora:
            return [o.contiguous().view(*shape, -1) for o in bases]
        G, L, r = len(self.members), self.members[0].max_loras, self.rank
        h = (down.view(-1, G, L, r) * rows.mask(L, down.dtype)[:, None, :, None]).view(-1, G, L * r)
        # Base rows have an all-zero h, so their delta is exactly 0 and they stay bit-identical.
        return [self.packed_b[g].add_linear(y, h[:, g], self.b_members[g]).view(*shape, -1)
                for g, y in enumerate(bases)]


def column_tiles(bt: torch.Tensor, pairs: bool, width: int = KERNEL_TILE) -> torch.Tensor:
    """[L, r, out] -> [L, ceil(out / width), r, width], zero-padded: each tile of `width` output columns
    holds all r rows contiguously, so the kernel's up-projection reads one stream instead of r. With
    `pairs` (the kernel's bf16 dot product), rows k and k+1 are interleaved: [.., ceil(r / 2), width, 2]."""
    L, r, out = bt.shape
    n = -(-out // width)
    t = F.pad(bt, (0, n * width - out)).view(L, r, n, width).permute(0, 2, 1, 3)
    if not pairs:
        return t.contiguous()
    t = F.pad(t, (0, 0, 0, r % 2))                         # an odd rank gets a zero partner row
    return t.reshape(L, n, -1, 2, width).transpose(3, 4).contiguous()


def link_projection_groups(model: nn.Module, kernel: object | None = None, arena: HugePageArena | None = None,
                           deltas_beside: bool = False) -> list[ProjectionGroup]:
    """Group sibling projections that read the same input (same parent, known names, same in_features);
    o_proj and down_proj form groups of one. `kernel`: the C++ multi-LoRA kernel, or None for PyTorch;
    `arena`: where the kernel path keeps the adapters' A stacks and B tiles (None: ordinary memory);
    `deltas_beside`: the kernel's deltas run on its helper thread during the base GEMM."""
    groups = []
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, MultiLoRALinear)]
            if members and len({m.in_features for m in members}) == 1:
                groups.append(ProjectionGroup(members, kernel, arena, deltas_beside))
    for group, nxt in zip(groups, groups[1:] + groups[:1]):
        group.next_group = nxt
    return groups
