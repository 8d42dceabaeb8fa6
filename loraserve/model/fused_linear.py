"""Sibling projections as one GEMM: q/k/v (and gate/up) read the same input, so stack their weights
and multiply once, as vLLM's QKVParallelLinear and MergedColumnParallelLinear do.

transformers calls the siblings one after another with the same tensor. The first call computes all
of them and keeps the others' outputs; the next calls with that same tensor object take theirs. A
call with another tensor (a model that feeds siblings different inputs) just computes again, so the
result never depends on how the model calls them, only the saving does.

Each output column of a GEMM is its own dot product over the same input row, so on CPU, with oneDNN
or our C++ GEMM, the stacked GEMM gives every member's columns bit for bit (tests/test_fused_linear.py
checks it). CPU only: cuBLAS picks its kernel by the matrices' shapes, and on an H200 the stacked
columns differed from the separate GEMMs' in the last bits, so on CUDA the siblings keep their own
GEMMs (transformers' calls exactly) and the base model's output stays bit for bit. On CPU bf16 at
decode batch sizes a GEMM call costs ~15 us of fixed overhead whatever its size, and the small k/v
GEMMs run far below the core's rate: one q/k/v GEMM instead of three saved ~20 us a layer."""

import torch
from torch import nn

from loraserve.model.cpu_gemm import PackedLinear, PackedWeight, gemm_kernel

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SiblingGroup:
    """Members that read the same input; `_compute(x)` returns every member's output."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._x: torch.Tensor | None = None               # the input whose outputs wait in _pending
        self._pending: dict[int, torch.Tensor] = {}

    def forward(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        idx = self.members.index(member)
        if self._x is x and idx in self._pending:
            out = self._pending.pop(idx)
            if not self._pending:
                self._x = None
            return out
        outs = self._compute(x)
        self._x, self._pending = x, {i: o for i, o in enumerate(outs) if i != idx}
        return outs[idx]

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every member's output for `x` from one call (model/decoder.py asks for them together), or None
        where the members must run their own forward."""
        return self._compute(x)

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


def stack_rows(linears: list[nn.Linear], extra_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum of out_features + extra_rows, in] weight holding the members' weights, then zero rows
    (and the same for the biases, if any member has one). Each member's weight and bias become row views
    of the stack, so the model keeps no second copy."""
    w0 = linears[0].weight
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in linears] + [w0.new_zeros(extra_rows, w0.shape[1])])
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias.detach() if m.bias is not None else w0.new_zeros(m.out_features)
                              for m in linears] + [w0.new_zeros(extra_rows)])
    start = 0
    for m in linears:
        rows = slice(start, start + m.out_features)
        m.weight = nn.Parameter(weight[rows], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(bias[rows], requires_grad=False)
        start += m.out_features
    return weight, bias


class FusedLinearGroup(SiblingGroup):
    """Plain nn.Linear siblings (no LoRA): their weights become row views of one stacked weight, so
    the model holds no second copy."""

    def __init__(self, members: list[nn.Linear]) -> None:
        super().__init__(members)
        self.outs = [m.out_features for m in members]
        self.weight, self.bias = stack_rows(members)
        self.packed = PackedWeight(kernel=gemm_kernel(members[0]))   # the members' own GEMM: same bits
        for m in members:
            m.__class__ = GroupedLinear
            m.group = self
            m.__dict__.pop("packed_weight", None)         # a PackedLinear's copy: the group packs its own
        self.packed.prepack(self.weight)                  # pack now, not on the first request

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.packed.linear(x, self.weight, self.bias)
        # Column views of y, not copies: every consumer (RoPE, SiLU, the decode loop's C++ ops) reads rows
        # that lie apart; copying them cost ~0.4 ms a SmolLM2 decode step.
        return list(y.split_with_sizes(self.outs, dim=-1))


class GroupedLinear(nn.Linear):
    """An nn.Linear whose forward is its FusedLinearGroup's: names, state dicts and isinstance checks
    stay as they were (the class is swapped in place, like PackedLinear)."""

    group: FusedLinearGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.forward(self, x)


def _plain_linear(module: nn.Module | None) -> bool:
    return type(module) in (nn.Linear, PackedLinear)


def stacks_bit_exactly(weight: torch.Tensor) -> bool:
    """Whether a stacked GEMM gives each member's columns bit for bit on `weight`'s device (see above)."""
    return weight.device.type == "cpu"


def fuse_sibling_linears(model: nn.Module) -> int:
    """Group every parent's plain q/k/v and gate/up linears (same input size, dtype and device, on CPU)
    into FusedLinearGroups; return how many groups. For a model without LoRA (LoRA layers group their own)."""
    count = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if not all(_plain_linear(m) for m in members):
                continue
            if (len({(m.in_features, m.weight.dtype, m.weight.device) for m in members}) == 1
                    and stacks_bit_exactly(members[0].weight)):
                FusedLinearGroup(members)
                count += 1
    return count
