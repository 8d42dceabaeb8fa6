"""The C++ multi-LoRA kernel (model/csrc/multi_lora.cpp) against a float64 reference written here: several
members with their own ranks and column offsets, odd ranks, sizes that are not multiples of the vector
width, base rows left untouched bit for bit; each row's result does not depend on the rows beside it
(blocks of 1, 2, 4 and 8 rows of one adapter, any thread count); bad arguments are refused. The LoRA
parity and isolation tests (test_lora_parity.py, test_engine_lora.py) run through it too."""

import gc
import time

import pytest
import torch

from kernel_fixtures import built_or_skip
from loraserve.lora.fused import column_tiles
from loraserve.model import kernels


@pytest.fixture(scope="module")
def kernel():
    return built_or_skip(kernels.multi_lora(), "LoRA uses its PyTorch path")


def members(in_dim: int, shapes: list[tuple[int, int]], slots: int, dtype: torch.dtype, seed: int = 0):
    """Per member (rank, out): A [L, r, in] and scaled B^T [L, r, out]."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(slots, r, in_dim, generator=g).to(dtype) * 0.2,
             torch.randn(slots, r, out, generator=g).to(dtype) * 0.2) for r, out in shapes]


def apply(kernel, x, token_slots, mems, y):
    """Run the kernel on a copy of y; the members sit side by side in y's columns."""
    out = y.clone()
    cols = [sum(b.shape[2] for _, b in mems[:g]) for g in range(len(mems))]
    tiles = [column_tiles(b, kernel.b_pairs(b)) for _, b in mems]
    kernel.multi_lora_apply(x, token_slots, [a for a, _ in mems], tiles, out, cols, [b.shape[2] for _, b in mems])
    return out


def reference(x, token_slots, mems, y):
    out, col = y.double().clone(), 0
    for a, b in mems:
        for t, s in enumerate(token_slots.tolist()):
            if s >= 0:
                out[t, col:col + b.shape[2]] += (x[t].double() @ a[s].double().t()) @ b[s].double()
        col += b.shape[2]
    return out


# in=40 and out=24 leave partial vectors; rank 3 is odd (bf16 pairs a zero row with it).
SHAPES = [(4, 40), (3, 24), (8, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_dim", [40, 64])
def test_matches_float64_reference_and_leaves_base_rows_alone(kernel, dtype, in_dim):
    torch.manual_seed(0)
    token_slots = torch.tensor([0, -1, 2, 1, 1, -1, 0, 2, 2, 2, 2, 2])
    mems = members(in_dim, SHAPES, slots=3, dtype=dtype)
    x = torch.randn(len(token_slots), in_dim).to(dtype)
    y = torch.randn(len(token_slots), sum(o for _, o in SHAPES) + 5).to(dtype)   # 5 columns no member owns
    got = apply(kernel, x, token_slots, mems, y)
    want = reference(x, token_slots, mems, y)
    base = token_slots < 0
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got[base].view(bits), y[base].view(bits))  # not touched at all
    assert torch.equal(got[:, -5:], y[:, -5:])
    if dtype == torch.float32:
        assert (got.double() - want).abs().max() < 1e-5
    else:
        # bf16: one rounding of the output (half an ulp) plus h rounded to bf16 on the way.
        assert ((got.double() - want).abs() / want.abs().clamp(min=1)).max() < 2e-2
        assert not torch.equal(got[~base], y[~base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_is_the_same_whatever_shares_its_batch(kernel, dtype, threads):
    """17 rows of slot 1 are split into blocks of 8, 8 and 1; each must equal that row run alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)
        token_slots = torch.tensor([1] * 9 + [0, -1, 2] + [1] * 8 + [0, 0, 0])
        mems = members(72, [(16, 48), (5, 40)], slots=3, dtype=dtype, seed=2)
        x = torch.randn(len(token_slots), 72).to(dtype)
        y = torch.randn(len(token_slots), 88).to(dtype)
        together = apply(kernel, x, token_slots, mems, y)
        bits = torch.int32 if dtype == torch.float32 else torch.int16    # compare bits: -0.0 is not +0.0
        for t in range(len(token_slots)):
            alone = apply(kernel, x[t:t + 1].clone(), token_slots[t:t + 1].clone(), mems, y[t:t + 1].clone())
            assert torch.equal(together[t].view(bits), alone[0].view(bits)), f"row {t} changed with its neighbours"
    finally:
        torch.set_num_threads(before)


def test_column_tiles_layout():
    bt = torch.arange(2 * 3 * 20, dtype=torch.float32).view(2, 3, 20)
    t = column_tiles(bt, pairs=False)
    assert t.shape == (2, 2, 3, 16)
    assert torch.equal(t[1, 1, 2, :4], bt[1, 2, 16:20]) and not t[1, 1, 2, 4:].any()
    p = column_tiles(bt, pairs=True)
    assert p.shape == (2, 2, 2, 16, 2)
    assert torch.equal(p[0, 0, 0, :, 0], bt[0, 0, :16]) and torch.equal(p[0, 0, 0, :, 1], bt[0, 1, :16])
    assert torch.equal(p[0, 0, 1, :, 0], bt[0, 2, :16]) and not p[0, 0, 1, :, 1].any()   # rank 3's zero partner


def test_bad_arguments_are_refused(kernel):
    mems = members(32, [(4, 16)], slots=2, dtype=torch.float32)
    x, y = torch.randn(3, 32), torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="has slot 2 of 2"):
        apply(kernel, x, torch.tensor([0, 2, -1]), mems, y)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        apply(kernel, x.t().contiguous().t(), torch.tensor([0, 1, -1]), mems, y)
    with pytest.raises(RuntimeError, match="overruns y's columns"):
        apply(kernel, x, torch.tensor([0, 1, -1]), mems, y[:, :8])
    with pytest.raises(RuntimeError, match="y must be a CPU"):
        apply(kernel, x, torch.tensor([0, 1, -1]), mems, y.to("meta"))
    with pytest.raises(RuntimeError, match="token_slots must be a contiguous int64 CPU"):
        apply(kernel, x, torch.tensor([0, 1, -1], device="meta"), mems, y)
    a, b = mems[0]
    with pytest.raises(RuntimeError, match=r"a\[0\] must be contiguous CPU"):
        apply(kernel, x, torch.tensor([0, 1, -1]), [(a.to("meta"), b)], y)
    with pytest.raises(RuntimeError, match=r"b\[0\] must be contiguous"):
        kernel.multi_lora_apply(x, torch.tensor([0, 1, -1]), [a], [b], y.clone(), [0], [16])
    with pytest.raises(RuntimeError, match="member 0 has a negative column or width"):
        kernel.Group([a], [column_tiles(b, kernel.b_pairs(b))], [-1], [16])
    group = kernel.Group([a], [column_tiles(b, kernel.b_pairs(b))], [0], [16])
    with pytest.raises(RuntimeError, match=r"x \[T, 31\] Float does not match the group's adapters \(\[L, r, 32\]"):
        group.apply(x[:, :31].contiguous(), torch.tensor([0, 1, -1]), y.clone())
    with pytest.raises(RuntimeError, match="does not match the group's adapters"):
        group.start(x.bfloat16(), torch.tensor([0, 1, -1]))


def test_no_members_adds_nothing(kernel):
    x, y = torch.randn(3, 32), torch.randn(3, 16)
    out = y.clone()
    kernel.multi_lora_apply(x, torch.tensor([-1, -1, -1]), [], [], out, [], [])
    kernel.Group([], [], [], []).apply(x, torch.tensor([-1, 0, -1]), out)
    assert torch.equal(out, y)


@pytest.mark.parametrize("with_arena", [False, True])
def test_slot_changes_recut_only_their_tiles_and_stay_exact(kernel, with_arena):
    """A group re-cuts B tiles only for the slots that changed; after adapters come and go (a member
    losing all its slots in between, a higher rank arriving) its tiles equal freshly cut ones. With a
    huge-page arena (model/arena.py) the A stacks and tiles the kernel reads live in it."""
    from loraserve.lora.adapter import ModuleDelta
    from loraserve.lora.fused import ProjectionGroup
    from loraserve.lora.layers import MultiLoRALinear
    from loraserve.model.arena import HugePageArena, hugepages_supported

    if with_arena and not hugepages_supported():
        pytest.skip("no MADV_HUGEPAGE here")
    torch.manual_seed(3)
    q, k = (MultiLoRALinear(torch.nn.Linear(32, o, bias=False), max_loras=3) for o in (40, 24))
    arena = HugePageArena(chunk_bytes=4 << 20) if with_arena else None
    group = ProjectionGroup([q, k], kernel, arena)

    def delta(r, out, **kw):
        return ModuleDelta(lora_a=torch.randn(r, 32), lora_b=torch.randn(out, r), scaling=0.5, rank=r, **kw)

    def check():
        group.plain()
        for m in (q, k):
            if m.slots_used:
                _, tiles = group.b_tiles[id(m)]
                assert torch.equal(tiles, column_tiles(m.lora_bt, kernel.b_pairs(m.lora_bt)))
                if arena is not None:
                    assert arena.holds(tiles) and arena.holds(m.lora_a)

    q.set_slot(0, delta(4, 40)), k.set_slot(0, delta(4, 24))
    check()
    q.set_slot(1, delta(4, 40)), k.clear_slot(0)          # k loses its only slot
    check()
    k.set_slot(2, delta(4, 24))                           # k's tiles must forget slot 0's old B
    check()
    q.clear_slot(0)
    check()
    q.set_slot(2, delta(8, 40))                           # a higher rank: lora_bt is replaced
    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_takes_the_models_leading_dims(kernel, dtype):
    """Group.apply flattens [1, T, in] / [1, T, out] itself (the model's shape): the same bits as the
    flat call, written into y's own storage."""
    token_slots = torch.tensor([1, -1, 0, 1, 2])
    mems = members(40, SHAPES, slots=3, dtype=dtype, seed=4)
    x = torch.randn(len(token_slots), 40).to(dtype)
    y = torch.randn(len(token_slots), sum(o for _, o in SHAPES)).to(dtype)
    cols = [sum(b.shape[2] for _, b in mems[:g]) for g in range(len(mems))]
    group = kernel.Group([a for a, _ in mems], [column_tiles(b, kernel.b_pairs(b)) for _, b in mems], cols,
                         [b.shape[2] for _, b in mems])
    y3 = y.clone()[None]
    group.apply(x[None], token_slots, y3)
    assert torch.equal(y3[0], apply(kernel, x, token_slots, mems, y))
    assert not torch.equal(y3[0], y)
    with pytest.raises(RuntimeError, match=r"x and y must be \[\.\.\., in\] and \[\.\.\., out\]"):
        group.apply(x[None], token_slots, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_started_deltas_finish_with_the_bits_of_apply(kernel, dtype):
    """Group.start runs the deltas on the helper thread while the caller computes y; finish adds them with
    the same one rounding apply uses: the same bits, base rows untouched. Many calls in a row reuse one
    helper; a second start before finish, a start with bad slots and a finish with a wrong y are refused,
    and each leaves the helper free for the next call."""
    torch.manual_seed(5)
    mems = members(72, [(16, 48), (5, 40), (3, 20)], slots=3, dtype=dtype, seed=6)
    cols = [0, 48, 90]                                  # a gap of two columns no member owns
    group = kernel.Group([a for a, _ in mems], [column_tiles(b, kernel.b_pairs(b)) for _, b in mems], cols,
                         [b.shape[2] for _, b in mems])
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for n in (1, 3, 17, 40):
        token_slots = torch.randint(-1, 3, (n,))
        x = torch.randn(1, n, 72).to(dtype)
        y = torch.randn(1, n, 112).to(dtype)
        want = y.clone()
        group.apply(x, token_slots, want)
        assert group.start(x, token_slots)
        got = y.clone()                                  # "the GEMM", while the deltas run
        group.finish(got)
        assert torch.equal(got.view(bits), want.view(bits)), f"{n} rows"
    assert group.start(x, token_slots)
    with pytest.raises(RuntimeError, match="a multi-LoRA job is already running: finish it first"):
        group.start(x, token_slots)
    with pytest.raises(RuntimeError, match="finish: y must be"):
        group.finish(y[:, :1])
    with pytest.raises(RuntimeError, match="has slot 3 of 3"):
        group.start(x, torch.full_like(token_slots, 3))
    assert not kernel.Group([], [], [], []).start(x, token_slots)    # no member has LoRA: nothing started
    assert group.start(x, token_slots)
    group.finish(y.clone())
    with pytest.raises(RuntimeError, match="finish without start"):
        group.finish(y.clone())
    with pytest.raises(RuntimeError, match=r"x must be \[\.\.\., in\]"):
        group.start(x[0, 0], token_slots)


def test_one_helper_runs_the_deltas_and_the_gemm_beside_them(kernel):
    """The engine makes every kernel extension use one helper thread (kernels.share_helper_thread). In a
    mixed step the deltas are posted first, then the base GEMM posts its column runs to the same helper,
    which works through the deltas and then joins the GEMM; finish shares the adds of the deltas with it:
    both results keep their one-thread bits, as do the in-place deltas (prompt chunks) with their blocks
    shared with the helper."""
    gemm = kernels.gemm()
    if gemm is None:
        pytest.skip("no GEMM kernel for this CPU: the base GEMM is oneDNN's, with no helper")
    kernels.share_helper_thread([kernels.paged_attention(), gemm, kernel])
    with pytest.raises(RuntimeError, match="expected the capsule from helper_capsule"):
        gemm.use_helper(_capsule_named("not.a.helper"))
    torch.manual_seed(7)
    mems = members(576, [(16, 576), (16, 192)], slots=4, dtype=torch.bfloat16, seed=8)
    group = kernel.Group([a for a, _ in mems], [column_tiles(b, kernel.b_pairs(b)) for _, b in mems], [0, 576],
                         [576, 192])
    w = torch.randn(768, 576).bfloat16()
    packed = gemm.pack(w)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in (1, 16, 40, 200):
            token_slots = torch.randint(-1, 4, (n,))
            x = torch.randn(n, 576).bfloat16()
            base_alone = gemm.linear(x, packed, 768)
            want = base_alone.clone()
            group.apply(x, token_slots, want)
            gemm.set_helper(True)
            kernel.set_helper(True)
            for _ in range(10):
                assert group.start(x, token_slots)
                y = gemm.linear(x, packed, 768)          # posts its runs behind the deltas
                assert torch.equal(y.view(torch.int16), base_alone.view(torch.int16))
                group.finish(y)
                assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"{n} rows"
                y = gemm.linear(x, packed, 768)          # prompt chunks: after the GEMM, blocks shared
                group.apply(x, token_slots, y)
                assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"{n} rows, in place"
            gemm.set_helper(False)
            kernel.set_helper(False)
    finally:
        gemm.set_helper(False)
        kernel.set_helper(False)
        torch.set_num_threads(before)


def test_reading_the_next_groups_adapters_ahead_changes_no_bit(kernel):
    """start(x, slots, next, after) also names the adapters the next two groups will read for these slots,
    for the idle helper to prefetch: the results keep their bits, whichever groups come next (with fewer
    slots, more members, or none), and a plan whose memory is freed before the helper reads it ahead is
    harmless (prefetches never fault)."""
    torch.manual_seed(9)
    mems = members(72, [(16, 48), (5, 40)], slots=4, dtype=torch.bfloat16, seed=10)

    def group_of(ms):
        return kernel.Group([a for a, _ in ms], [column_tiles(b, kernel.b_pairs(b)) for _, b in ms],
                            [sum(b.shape[2] for _, b in ms[:g]) for g in range(len(ms))], [b.shape[2] for _, b in ms])

    group = group_of(mems)
    fewer = group_of(members(40, [(8, 24)], slots=2, dtype=torch.bfloat16, seed=11))
    more = group_of(members(72, [(4, 16), (4, 16), (4, 32)], slots=4, dtype=torch.bfloat16, seed=12))
    token_slots = torch.tensor([0, 3, -1, 1, 3, 3, 2, 0])
    x = torch.randn(8, 72).bfloat16()
    y = torch.randn(8, 88).bfloat16()
    want = y.clone()
    group.apply(x, token_slots, want)
    for nxt, after in [(None, None), (group, None), (fewer, None), (more, None), (kernel.Group([], [], [], []), None),
                       (fewer, more), (more, group), (None, fewer)]:
        for _ in range(5):
            assert group.start(x, token_slots, nxt, after)
            got = y.clone()
            group.finish(got)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    gone = group_of(members(4096, [(64, 4096)], slots=4, dtype=torch.bfloat16, seed=13))
    assert group.start(x, token_slots, gone)
    group.finish(y.clone())
    del gone                                               # 8 MB of planned adapters freed (unmapped),
    gc.collect()                                           # likely while the helper is still reading them
    time.sleep(0.05)
    assert group.start(x, token_slots)
    got = y.clone()
    group.finish(got)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def _capsule_named(name: str) -> object:
    """A PyCapsule of another name than the helper's (ctypes: the Python C API's PyCapsule_New)."""
    import ctypes
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    keep = ctypes.create_string_buffer(name.encode())      # the capsule keeps a pointer to its name
    _capsule_named.names = getattr(_capsule_named, "names", []) + [keep]
    return new(ctypes.addressof(keep), keep, None)
