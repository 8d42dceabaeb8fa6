"""The C++ paged-attention kernel (model/csrc/paged_attention.cpp) against a float64 reference written
here: GQA, head sizes with and without a compiled fast path, sliding windows, soft-capping, ragged
lengths over scattered blocks, prompt rows beside decodes; each query's output does not depend on what
else is in the batch, nor on which thread computed it.
The engine-level parity tests (test_engine_parity.py) run through it too."""

import pytest
import torch

from kernel_fixtures import built_or_skip
from loraserve.model import kernels

BS = 4


@pytest.fixture(scope="module")
def kernel():
    return built_or_skip(kernels.paged_attention(), "the engine uses its PyTorch path")


def reference(q, k_cache, v_cache, tables, lens, scale, softcap, window, bs: int = BS) -> torch.Tensor:
    """Per sequence and head, in float64: softmax(q k^T * scale [soft-capped]) v over its visible keys."""
    b_, h, d = q.shape
    hkv = k_cache.shape[0]
    out = torch.empty(b_, h, d, dtype=torch.float64)
    for b in range(b_):
        n = int(lens[b])
        slots = torch.tensor([int(tables[b, t // bs]) * bs + t % bs for t in range(n)])
        first = max(0, n - window) if window > 0 else 0
        k = k_cache[:, slots[first:]].double()          # [Hkv, n', D]
        v = v_cache[:, slots[first:]].double()
        for head in range(h):
            kv = head // (h // hkv)
            s = (k[kv] @ q[b, head].double()) * scale
            if softcap > 0:
                s = torch.tanh(s / softcap) * softcap
            out[b, head] = torch.softmax(s, dim=0) @ v[kv]
    return out


def case(seed: int, b: int, h: int, hkv: int, d: int, dtype: torch.dtype, max_len: int = 40, bs: int = BS):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.randn(hkv, num_blocks * bs, d, generator=g).to(dtype)
    v_cache = torch.randn(hkv, num_blocks * bs, d, generator=g).to(dtype)
    lens = torch.randint(1, max_len + 1, (b,), generator=g)
    lens[0] = 1                                                     # a one-token context
    width = -(-max_len // bs)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in range(b)])
    q = torch.randn(b, h, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens


@pytest.mark.parametrize("h,hkv,d", [(4, 2, 16), (9, 3, 64), (8, 8, 128), (6, 2, 24)])
@pytest.mark.parametrize("softcap,window", [(0.0, 0), (0.0, 7), (30.0, 0)])
def test_float32_equals_the_reference(kernel, h, hkv, d, softcap, window):
    q, k, v, tables, lens = case(h * d + window, 6, h, hkv, d, torch.float32)
    scale = d ** -0.5 * 1.3
    got = kernel.paged_decode_attention(q, k, v, tables, lens, BS, scale, softcap, window)
    want = reference(q, k, v, tables, lens, scale, softcap, window)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert (got.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (8, 2, 128), (6, 2, 24)])   # 64, 128: vdpbf16ps scores
@pytest.mark.parametrize("softcap,window", [(0.0, 0), (0.0, 7), (30.0, 0)])
@pytest.mark.parametrize("bs", [BS, 16, 32])                     # keys scored 16 at a time: partial, whole, two
def test_bfloat16_is_close_to_the_reference(kernel, h, hkv, d, softcap, window, bs):
    q, k, v, tables, lens = case(h + d + window, 8, h, hkv, d, torch.bfloat16, max_len=70, bs=bs)
    got = kernel.paged_decode_attention(q, k, v, tables, lens, bs, 0.125, softcap, window)
    want = reference(q, k, v, tables, lens, 0.125, softcap, window, bs)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() < 2e-2      # inputs and output rounded to bf16, math in float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequence_gets_the_same_bits_whatever_shares_its_batch(kernel, dtype):
    q, k, v, tables, lens = case(2, 8, 9, 3, 64, dtype, max_len=70)
    together = kernel.paged_decode_attention(q, k, v, tables, lens, BS, 0.125, 0.0, 0)
    for i in (0, 3, 7):
        alone = kernel.paged_decode_attention(q[i:i + 1].contiguous(), k, v, tables[i:i + 1].contiguous(),
                                              lens[i:i + 1].contiguous(), BS, 0.125, 0.0, 0)
        assert torch.equal(alone[0], together[i])


def test_prompt_rows_attend_over_their_own_prefix(kernel):
    """The engine passes a prompt chunk's tokens as rows of their own: the sequence's table, each token's
    position + 1 as its length (model_runner.py). Mixed with decode rows, each equals the reference."""
    g = torch.Generator().manual_seed(9)
    k = torch.randn(3, 64 * BS, 32, generator=g)
    v = torch.randn(3, 64 * BS, 32, generator=g)
    chunk, other = torch.randperm(64, generator=g)[:6], torch.randperm(64, generator=g)[:6]
    positions = torch.arange(5, 17)                                 # a chunk of 12 prompt tokens, 5 already cached
    tables = torch.cat([chunk.expand(12, -1), other[None], other[None]])
    lens = torch.cat([positions + 1, torch.tensor([20, 9])])        # and two decodes
    q = torch.randn(14, 6, 32, generator=g)
    got = kernel.paged_decode_attention(q, k, v, tables, lens, BS, 0.2, 0.0, 0)
    assert (got.double() - reference(q, k, v, tables, lens, 0.2, 0.0, 0)).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_helper_thread_shares_pairs_and_changes_no_bit(kernel, dtype):
    """With one torch thread and the helper on (the engine's serving default on 2+ cores), the helper thread
    takes runs of (query, head) pairs: every element equals the one-thread result, whichever thread ran it."""
    q, k, v, tables, lens = case(4, 16, 9, 3, 64, dtype, max_len=70)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = kernel.paged_decode_attention(q, k, v, tables, lens, BS, 0.125, 0.0, 0)
        kernel.set_helper(True)
        shared = [kernel.paged_decode_attention(q, k, v, tables, lens, BS, 0.125, 0.0, 0) for _ in range(20)]
    finally:
        kernel.set_helper(False)
        torch.set_num_threads(before)
    assert all(torch.equal(s, alone) for s in shared)


def test_bad_inputs_are_refused_not_read_out_of_bounds(kernel):
    q, k, v, tables, lens = case(3, 2, 4, 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernel.paged_decode_attention(q.double(), k, v, tables, lens, BS, 0.25, 0.0, 0)
    with pytest.raises(RuntimeError, match="one table per query"):
        kernel.paged_decode_attention(q, k, v, tables[:1].contiguous(), lens, BS, 0.25, 0.0, 0)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        kernel.paged_decode_attention(q, k, v, tables, lens + tables.shape[1] * BS, BS, 0.25, 0.0, 0)
    bad = tables.clone()
    bad[1, 0] = k.shape[1] // BS
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel.paged_decode_attention(q, k, v, bad, lens.clamp(min=1), BS, 0.25, 0.0, 0)


def test_a_kernel_that_cannot_be_built_is_logged_and_the_engine_keeps_pytorch(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found\nmore")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    kernels.paged_attention.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="loraserve.model.kernels"):
            assert kernels.paged_attention() is None
        want = "CPU paged_attention kernel not built (RuntimeError: Error building extension: c++: not found)"
        assert want in caplog.text
        assert "PyTorch path" in caplog.text
    finally:
        kernels.paged_attention.cache_clear()     # the next caller builds (or loads) the real one again
