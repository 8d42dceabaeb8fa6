"""The C++ bf16 GEMM (model/csrc/gemm.cpp) against a float64 reference written here: within one float32
summation and one bf16 rounding of it; each row the same bits whatever shares its batch and however many
threads run; stacked columns the same bits as separate ones; bad arguments refused with a message; and an
engine on such a CPU runs every linear layer through it."""

import pytest
import torch

from kernel_fixtures import built_or_skip
from loraserve.config import EngineConfig, LoRAConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.lora.fused import ProjectionGroup
from loraserve.model import kernels
from loraserve.model.arena import hugepages_supported
from loraserve.model.cpu_gemm import PackedLinear, PackedWeight, weight_arena
from loraserve.model.fused_linear import FusedLinearGroup
from tiny_models import IdTokenizer, tiny_model

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def gemm():
    flags = kernels._cpu_flags().split()
    if "avx512_bf16" not in flags and not {"avx2", "fma"} <= set(flags):
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2 with FMA: bf16 linear layers use oneDNN")
    return built_or_skip(kernels.gemm(), "bf16 linear layers use oneDNN")


def data(rows: int, in_f: int, out_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, in_f, generator=g).to(BF16), torch.randn(out_f, in_f, generator=g).to(BF16),
            torch.randn(out_f, generator=g).to(BF16))


@pytest.mark.parametrize("rows", [1, 3, 7, 8, 15, 16, 17, 100])
@pytest.mark.parametrize("in_f,out_f", [(64, 96), (576, 960), (37, 40), (1536, 7), (2, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(gemm, rows, in_f, out_f, with_bias):
    x, w, b = data(rows, in_f, out_f, seed=rows + in_f)
    b = b if with_bias else None
    got = gemm.linear(x, gemm.pack(w), out_f, b).double()
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
    # float32 sums of exact bf16 products (error <= in_f * 2^-24 * sum |x w|), then one bf16 rounding.
    bound = 2.0 ** -8 * ref.abs() + in_f * 2.0 ** -23 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((got - ref).abs() <= bound).all()
    assert (got - torch.nn.functional.linear(x, w, b).double()).abs().max() <= 2.0 ** -7 * ref.abs().max()


@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_is_the_same_whatever_shares_its_batch(gemm, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, b = data(37, 96, 200)
        packed = gemm.pack(w)
        together = gemm.linear(x, packed, 200, b)
        for t in range(37):
            assert torch.equal(gemm.linear(x[t:t + 1].clone(), packed, 200, b), together[t:t + 1])
        assert torch.equal(gemm.linear(x[5:21].clone(), packed, 200, b), together[5:21])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(gemm.linear(x, packed, 200, b), together)     # and with the suite's own threads


@pytest.mark.parametrize("rows", [1, 16, 40])
@pytest.mark.parametrize("in_f,out_f", [(576, 960), (576, 4 * 3 * 16), (64, 49152)])
def test_the_helper_thread_shares_columns_and_changes_no_bit(gemm, rows, in_f, out_f):
    """With one torch thread and the helper on, the helper thread takes runs of column blocks (the engine
    turns it on when it serves with one thread on 2+ cores): every element equals the one-thread result.
    The helper may get no core at all: the caller then does every run itself, with the same result."""
    x, w, b = data(rows, in_f, out_f, seed=rows)
    packed = gemm.pack(w)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = gemm.linear(x, packed, out_f, b)
        gemm.set_helper(True)
        shared = [gemm.linear(x, packed, out_f, b) for _ in range(20)]
    finally:
        gemm.set_helper(False)
        torch.set_num_threads(before)
    assert all(torch.equal(s.view(torch.int16), alone.view(torch.int16)) for s in shared)


def test_stacked_columns_equal_separate_weights(gemm):
    """q/k/v, gate/up and LoRA's projection groups stack their members' weights into one GEMM."""
    x, _, _ = data(16, 64, 1)
    ws = [data(1, 64, o, seed=o)[1] for o in (64, 24, 24, 40)]
    stacked = gemm.linear(x, gemm.pack(torch.cat(ws)), 152)
    separate = torch.cat([gemm.linear(x, gemm.pack(w), w.shape[0]) for w in ws], dim=1)
    assert torch.equal(stacked, separate)


def test_takes_leading_dims_and_empty_batches(gemm):
    x, w, b = data(6, 32, 48)
    packed = gemm.pack(w)
    assert torch.equal(gemm.linear(x.view(2, 3, 32), packed, 48, b), gemm.linear(x, packed, 48, b).view(2, 3, 48))
    assert gemm.linear(x[:0], packed, 48).shape == (0, 48)
    strided = torch.randn(6, 64).to(BF16)[:, ::2]                 # not contiguous: copied first
    assert torch.equal(gemm.linear(strided, packed, 48), gemm.linear(strided.contiguous(), packed, 48))


def test_bad_arguments_are_refused(gemm):
    x, w, _ = data(4, 32, 48)
    packed = gemm.pack(w)
    with pytest.raises(RuntimeError, match="do not match the packed weight"):
        gemm.linear(x[:, :30], packed, 48)
    with pytest.raises(RuntimeError, match="do not match the packed weight"):
        gemm.linear(x, packed, 80)
    with pytest.raises(RuntimeError, match="expected a CPU bf16 tensor"):
        gemm.linear(x.float(), packed, 48)
    with pytest.raises(RuntimeError, match="expected a contiguous CPU bf16"):
        gemm.linear(x, w, 48)
    with pytest.raises(RuntimeError, match="bias: expected 48 CPU bf16"):
        gemm.linear(x, packed, 48, torch.zeros(47, dtype=BF16))
    with pytest.raises(RuntimeError, match="bias: expected 48 CPU bf16"):
        gemm.linear(x, packed, 48, torch.zeros(48))
    with pytest.raises(RuntimeError, match="pack: expected a CPU bf16"):
        gemm.pack(w.float())


def test_packed_weight_follows_its_source(gemm):
    w = torch.ones(8, 4, dtype=BF16)
    x = torch.ones(2, 4, dtype=BF16)
    pw = PackedWeight(kernel=gemm)
    assert pw.linear(x, w)[0, 0] == 4 and pw.packed.shape == (1, 2, 16, 2)
    w.mul_(2)                               # changed in place: repacked
    assert pw.linear(x, w)[0, 0] == 8
    with pytest.raises(AssertionError, match="oneDNN's"):
        pw.add_linear(x, x, w)


@pytest.mark.skipif(not hugepages_supported(), reason="no MADV_HUGEPAGE here")
def test_weights_packed_once_live_on_huge_pages_with_the_same_bits(gemm):
    """Base weights are packed once and streamed every step: their packed copies go to the huge-page
    arena; a settling weight (re-packed as adapters come and go) stays in ordinary memory."""
    x, w, b = data(16, 576, 960, seed=3)
    once, settling = PackedWeight(kernel=gemm), PackedWeight(settle_calls=1, kernel=gemm)
    y = once.linear(x, w, b)
    assert weight_arena().holds(once.packed)
    assert torch.equal(y, gemm.linear(x, gemm.pack(w), 960, b))
    settling.linear(x, w, b)
    assert torch.equal(settling.linear(x, w, b), y) and not weight_arena().holds(settling.packed)


def _gemms(engine: LLMEngine) -> set:
    """Which GEMM every packed weight of the engine's model runs on (None: oneDNN)."""
    found = set()
    for m in engine.model.modules():
        if isinstance(m, PackedLinear):
            found.add(m.packed_weight.kernel)
        group = getattr(m, "group", None)
        if isinstance(group, FusedLinearGroup):
            found.add(group.packed.kernel)
        elif isinstance(group, ProjectionGroup):
            found.add(group.packed_w.kernel)
    return found


@pytest.mark.parametrize("enable_lora", [False, True])
def test_a_bf16_cpu_engine_runs_every_linear_on_the_kernel(gemm, enable_lora):
    def engine(cpu_kernels: bool) -> LLMEngine:
        model, _ = tiny_model("llama", dtype=BF16)
        cfg = EngineConfig(model="tiny", num_kv_blocks=64, block_size=4, cpu_kernels=cpu_kernels,
                           lora=LoRAConfig(enable_lora=enable_lora, max_loras=2))
        return LLMEngine(cfg, model, IdTokenizer())

    assert _gemms(engine(True)) == {gemm}
    assert _gemms(engine(False)) == {None}                        # --no-cpu-kernels: oneDNN throughout
    model, _ = tiny_model("llama", dtype=torch.float32)           # float32: plain F.linear, nothing packed
    assert _gemms(LLMEngine(EngineConfig(model="tiny", num_kv_blocks=64), model, IdTokenizer())) == {None}
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_a_kernel_build_is_named_after_its_source_and_the_headers_it_includes(tmp_path, monkeypatch):
    """fast_exp.h is shared by two kernels: editing it must give both new builds, not load stale ones."""
    for f in kernels.CSRC.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(kernels, "CSRC", tmp_path)
    before = kernels._digest("layer_ops", kernels.CFLAGS_NO_FMA)
    assert kernels._digest("layer_ops", kernels.CFLAGS_NO_FMA) == before
    (tmp_path / "fast_exp.h").write_text((tmp_path / "fast_exp.h").read_text() + "\n// edited\n")
    assert kernels._digest("layer_ops", kernels.CFLAGS_NO_FMA) != before
    assert kernels._digest("layer_ops", kernels.CFLAGS) != kernels._digest("layer_ops", kernels.CFLAGS_NO_FMA)


def test_building_a_kernel_leaves_the_flags_and_so_the_next_digest_alone(gemm):
    """cpp_extension.load appends torch's libraries to the flag lists it is given: were they ours, each
    build would change the next kernel's digest, and a kernel would be rebuilt under a new name
    depending on what the process had built before (once killed mid-build, its lock hung every start)."""
    flags, ldflags = list(kernels.CFLAGS_EXACT), list(kernels.LDFLAGS)
    assert kernels._build("gemm", "bf16 linear layers", kernels.CFLAGS_EXACT).__name__ == gemm.__name__
    assert kernels.CFLAGS_EXACT == flags and kernels.LDFLAGS == ldflags
