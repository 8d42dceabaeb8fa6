"""Linear layers whose weights are prepacked (CPU, bf16), for oneDNN or for our own GEMM kernel.

On CPU a bf16 `F.linear` hands its weight to oneDNN in plain layout, and oneDNN reorders it into its
blocked layout on every call: each decode step reads every weight, writes the blocked copy and reads
that again. Packing each weight once, as vLLM's CPU backend and inductor's weight freezing do, cut the
GEMM time of a batch-16 SmolLM2 decode step by ~30% on 2 cores (bench/README.md). oneDNN's packed
results are bit-identical to `F.linear` (tests/test_cpu_gemm.py checks it over many shapes).

On CPUs with AVX512-BF16 the engine passes the C++ GEMM (model/csrc/gemm.cpp, `kernels.gemm()`)
instead: 1.55x oneDNN's speed at 16 rows (bench/gemm.py). On CPUs with only AVX2 and FMA, where oneDNN
has no bf16 GEMM at all, the same kernel's AVX2 path is the only packed one. Its results can differ
from oneDNN's in the last bit (another summation order), but each element is one float32 sum in a fixed
order, so a row's result never depends on the rest of the batch, nor a column's on the columns stacked
beside it: isolation holds on either backend. `add_linear` (the PyTorch LoRA path's B GEMMs) is oneDNN's only.

The plain weight stays: tied embeddings, LoRA's stacked groups and DoRA's norms read it. A packed copy
follows its source: it is rebuilt when the weight is replaced or changed in place.

The kernel's packed copies that are packed once (the base weights) live on transparent huge pages
(model/arena.py): a decode step streams every weight from memory, 270 MB for SmolLM2, and on 4 KB pages
that is ~66,000 TLB misses and page walks a step. A 2-core Zen 4, base decode steps alternated in one
process: 2.3% faster (bench/README.md, session 15)."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.model.arena import HugePageArena, hugepages_supported


@functools.cache
def weight_arena() -> HugePageArena | None:
    """Where packed base weights go (one arena for the process: they are packed together at start-up and
    live as long as the model), or None without MADV_HUGEPAGE."""
    return HugePageArena() if hugepages_supported() else None


@functools.cache
def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def supported(weight: torch.Tensor, kernel: object | None = None) -> bool:
    """Whether `weight` multiplies from a packed copy: CPU bf16, for `kernel` (kernels.gemm()) or, without
    one, for oneDNN where it has a bf16 GEMM (not on CPUs without AVX512, where the kernel's AVX2 path is
    the only fast one)."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and (kernel is not None or _onednn_bf16())


class PackedWeight:
    """The oneDNN-packed copy of one weight, rebuilt when the source tensor or its contents change.

    `settle_calls`: after a change, multiply from the plain weight for this many calls before packing.
    LoRA's stacked groups change whenever an adapter enters a slot, and repacking them all costs ~150 ms
    for SmolLM2 on one core: waiting until the slots have been stable for a while means adapters churning
    through the slots run on plain GEMMs (~1.4x the time) instead of stalling on a repack each time. Both
    paths give the same bits."""

    def __init__(self, settle_calls: int = 0, kernel: object | None = None) -> None:
        self.settle_calls = settle_calls
        self.kernel = kernel                 # kernels.gemm() (AVX512-BF16 or AVX2 CPUs), or None for oneDNN
        self.source: torch.Tensor | None = None
        self.version = -1
        self.packed: torch.Tensor | None = None
        self.calls_since_change = 0

    def current(self, weight: torch.Tensor) -> bool:
        """Whether the copy (packed or still settling) is of `weight` as it is now."""
        return self.source is weight and self.version == weight._version

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of `weight` (packed now if due), or None while it is settling after a change."""
        if not self.current(weight):
            self.source, self.version, self.packed, self.calls_since_change = weight, weight._version, None, 0
        if self.packed is None:
            self.calls_since_change += 1
            if self.calls_since_change <= self.settle_calls:
                return None
            if self.kernel is not None:
                self.packed = self.kernel.pack(weight.detach())
                arena = weight_arena() if self.settle_calls == 0 else None   # churning copies: ordinary memory
                if arena is not None:
                    self.packed = arena.copy(self.packed)
            else:
                # The batch-size hint only picks oneDNN's blocking; any row count works with it and gives
                # the same result. 16 is a typical decode batch.
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
        return self.packed

    def prepack(self, weight: torch.Tensor) -> None:
        """Pack `weight` now, at start-up, where `linear` will use the packed copy (CPU bf16); elsewhere
        (CUDA, float32) there is nothing to pack."""
        if supported(weight, self.kernel):
            self.get(weight)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, weight, bias)` from the packed copy where it applies (oneDNN's: bit for bit)."""
        packed = self.packed
        # The common case first: packed, and its source unchanged (~120 calls a decode step).
        if packed is None or not self.current(weight) or x.dtype != weight.dtype:
            packed = self.get(weight) if x.dtype == weight.dtype and supported(weight, self.kernel) else None
        if packed is None:
            return F.linear(x, weight, bias)
        if self.kernel is not None:
            return self.kernel.linear(x, packed, weight.shape[0], bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def add_linear(self, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`torch.addmm(y, x, weight.t())`, bit for bit: y plus x's product, added inside the GEMM in
        float32 and rounded once (where y is all a row gets, x's row is zero and y comes back exact)."""
        assert self.kernel is None, "add_linear is oneDNN's: build this PackedWeight without a kernel"
        packed = self.get(weight) if x.dtype == weight.dtype and supported(weight) else None
        if packed is None:
            return torch.addmm(y, x, weight.t())
        return torch.ops.mkldnn._linear_pointwise.binary(x, y, packed, None, "add")


class PackedLinear(nn.Linear):
    """An nn.Linear that multiplies with its packed weight. `prepack_linears` switches a loaded model's
    linears to this class in place, so module names, state dicts and `isinstance(m, nn.Linear)` (which
    LoRA wrapping and PEFT's naming rely on) all stay as they were."""

    packed_weight: PackedWeight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed_weight.linear(x, self.weight, self.bias)


def prepack_linears(model: nn.Module, kernel: object | None = None) -> int:
    """Switch every plain nn.Linear with a CPU bf16 weight to PackedLinear; return how many. `kernel`:
    kernels.gemm() to pack for it, or None for oneDNN."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and supported(module.weight, kernel):
            module.__class__ = PackedLinear
            module.packed_weight = PackedWeight(kernel=kernel)
            module.packed_weight.get(module.weight)     # pack now, not on the first request
            count += 1
    return count


def gemm_kernel(linear: nn.Module) -> object | None:
    """The GEMM kernel `linear` was packed for (None: oneDNN, or not packed). Groups that stack linears
    use their members' kernel, so a column comes out with the same bits stacked or alone."""
    packed = getattr(linear, "packed_weight", None)
    return packed.kernel if packed is not None else None
