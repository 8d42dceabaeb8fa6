"""The lean forward's small C++ ops (model/csrc/layer_ops.cpp) against their PyTorch versions
(decoder.TorchOps, transformers' own formulas): RMSNorm, the residual add, RoPE with the KV-cache write,
SiLU-and-multiply and the greedy argmax. bf16 results match PyTorch's to the last bit but for RMSNorm's
and SiLU's rare last-bit ties; every row is the same whatever shares its batch; bad arguments are
refused with a message."""

import pytest
import torch

from kernel_fixtures import built_or_skip
from loraserve.model import kernels
from loraserve.model.decoder import TorchOps

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def ops():
    return built_or_skip(kernels.layer_ops(), "the lean forward uses PyTorch ops")


def randn(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_close_to_torch(got: torch.Tensor, ref: torch.Tensor):
    """bf16: at most one unit in the last place apart, and nearly all equal; float32: float rounding."""
    if got.dtype == torch.bfloat16:
        diff = (got.float() - ref.float()).abs()
        assert (diff <= ref.float().abs() * 2.0 ** -7 + 1e-30).all()
        assert (got != ref).float().mean() < 0.01
    else:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual_add_match_pytorch(ops, dtype):
    x, res = randn(16, 576, dtype=dtype, scale=3), randn(16, 576, dtype=dtype, seed=1)
    w = randn(576, dtype=dtype, seed=2)
    assert_close_to_torch(ops.rms_norm(x, w, 1e-5), TorchOps.rms_norm(x, w, 1e-5))
    r_cpp, r_torch = res.clone(), res.clone()
    out = ops.add_rms_norm(x, r_cpp, w, 1e-5)
    assert torch.equal(r_cpp, r_torch.add_(x))            # the residual sum is one rounded add, as in PyTorch
    assert_close_to_torch(out, TorchOps.rms_norm(r_torch, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 32, 6])
def test_rope_and_kv_write_match_pytorch(ops, dtype, d):
    t, h, hkv, slots = 5, 6, 2, 40
    # q/k/v as column views of one stacked projection output, as the fused q/k/v GEMM returns them.
    qkv = randn(t, (h + 2 * hkv) * d, dtype=dtype, seed=d)
    q, k, v = (p.view(t, -1, d) for p in qkv.split([h * d, hkv * d, hkv * d], dim=-1))
    pos = torch.tensor([0, 7, 3, 100, 31])
    freqs = pos[:, None].float() / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slot_ids = torch.tensor([3, 17, 0, 39, 20])
    caches = [randn(hkv, slots, d, dtype=dtype, seed=9) for _ in range(2)]
    k_cpp, v_cpp = (c.clone() for c in caches)
    k_ref, v_ref = (c.clone() for c in caches)
    q_cpp = ops.rope_write_kv(q, k, v, cos, sin, k_cpp, v_cpp, slot_ids)
    q_ref = TorchOps.rope_write_kv(q, k, v, cos, sin, k_ref, v_ref, slot_ids)
    # Each term and the sum are rounded as PyTorch rounds them: the same bits.
    assert torch.equal(q_cpp, q_ref)
    assert torch.equal(k_cpp, k_ref) and torch.equal(v_cpp, v_ref)   # other slots untouched, as index_copy_
    assert not torch.equal(k_cpp, caches[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_reads_column_views_and_matches_pytorch(ops, dtype):
    gate_up = randn(16, 2 * 1536, dtype=dtype, scale=4)
    gate, up = gate_up.split(1536, dim=-1)                 # the fused gate/up GEMM's two halves
    assert not gate.is_contiguous()
    assert_close_to_torch(ops.silu_mul(gate, up), TorchOps.silu_mul(gate, up))
    # Where exp under- or overflows: silu(-200) is -0 and silu(200) is 200, as PyTorch has them.
    extreme = torch.tensor([[-200.0, -90.0, -88.5, -20.0, 0.0, 20.0, 90.0, 200.0]], dtype=dtype)
    one = torch.ones_like(extreme)
    assert torch.equal(ops.silu_mul(extreme, one), TorchOps.silu_mul(extreme, one))


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_is_the_same_whatever_shares_its_batch(ops, dtype):
    x, res, w = randn(37, 96, dtype=dtype), randn(37, 96, dtype=dtype, seed=1), randn(96, dtype=dtype, seed=2)
    batch_res = res.clone()
    together = ops.add_rms_norm(x, batch_res, w, 1e-6)
    g, u = randn(37, 200, dtype=dtype, seed=3), randn(37, 200, dtype=dtype, seed=4)
    silu = ops.silu_mul(g, u)
    for t in (0, 5, 36):
        r = res[t:t + 1].clone()
        assert torch.equal(ops.add_rms_norm(x[t:t + 1], r, w, 1e-6), together[t:t + 1])
        assert torch.equal(r, batch_res[t:t + 1])
        assert torch.equal(ops.silu_mul(g[t:t + 1], u[t:t + 1]), silu[t:t + 1])


@pytest.mark.parametrize("rows", [8, 16, 100])
def test_the_helper_thread_shares_rows_and_changes_no_bit(ops, rows):
    """With one torch thread and the helper on (the serving default on 2+ cores), batches of 8 or more rows
    are shared with the helper thread: every op's result equals the one-thread result. (The helper may get
    no core at all: the caller then does every run itself, with the same result.)"""
    d, h, hkv, slots = 64, 9, 3, 128
    x, res, w = randn(rows, 576, dtype=torch.bfloat16, scale=3), randn(rows, 576, dtype=torch.bfloat16, seed=1), \
        randn(576, dtype=torch.bfloat16, seed=2)
    gate_up = randn(rows, 2 * 1536, dtype=torch.bfloat16, seed=3, scale=4)
    qkv = randn(rows, (h + 2 * hkv) * d, dtype=torch.bfloat16, seed=4)
    cos, sin = randn(rows, d, dtype=torch.bfloat16, seed=5), randn(rows, d, dtype=torch.bfloat16, seed=6)
    slot_ids = torch.randperm(slots, generator=torch.Generator().manual_seed(rows))[:rows]
    logits = randn(rows, 4099, dtype=torch.bfloat16, seed=7)

    def run_all():
        r = res.clone()
        caches = [torch.zeros(hkv, slots, d, dtype=torch.bfloat16) for _ in range(2)]
        q, k, v = (p.view(rows, -1, d) for p in qkv.split([h * d, hkv * d, hkv * d], dim=-1))
        outs = [ops.add_rms_norm(x, r, w, 1e-5), r, ops.rms_norm(x, w, 1e-5), ops.silu_mul(*gate_up.split(1536, -1)),
                ops.rope_write_kv(q, k, v, cos, sin, *caches, slot_ids), *caches, ops.argmax(logits)]
        return [o.view(torch.int16) if o.dtype == torch.bfloat16 else o for o in outs]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run_all()
        ops.set_helper(True)
        shared = [run_all() for _ in range(10)]
    finally:
        ops.set_helper(False)
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for s in shared for a, b in zip(s, alone))


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_is_torchs_first_maximum(ops, dtype):
    logits = randn(16, 49152, dtype=dtype)
    logits[3, 100] = logits[3, 40000] = 50                  # a tie: the first index wins
    logits[4, 49151] = 60                                    # the last element (past the vector loop)
    logits[5] = float("-inf")
    logits[6, 777] = float("nan")                            # torch counts NaN as the maximum
    logits[6, 900] = float("nan")
    odd = randn(3, 1001, dtype=dtype, seed=5)                # a width that is not a multiple of 16
    for x in (logits, odd, logits[:, :17], logits[2:9]):
        assert torch.equal(ops.argmax(x), x.argmax(dim=-1))


def test_bad_arguments_are_refused_with_a_message(ops):
    x = randn(4, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(x, randn(7, dtype=torch.float32), 1e-6)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        ops.rms_norm(x.double(), randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="residual must be contiguous"):
        ops.add_rms_norm(x, randn(8, 4, dtype=torch.float32).t(), randn(8, dtype=torch.float32), 1e-6)
    with pytest.raises(RuntimeError, match="gate and up must match"):
        ops.silu_mul(x, randn(4, 9, dtype=torch.float32))
    q, k = randn(2, 4, 8, dtype=torch.float32), randn(2, 2, 8, dtype=torch.float32)
    cos = sin = randn(2, 8, dtype=torch.float32)
    cache = torch.zeros(2, 10, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.rope_write_kv(q, k, k, cos, sin, cache, cache.clone(), torch.tensor([1, 10]))
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.rope_write_kv(q, k, k, cos, sin, cache.bfloat16(), cache.bfloat16(), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"q \[T, H, D\], k and v \[T, Hkv, D\], with an even D"):
        ops.rope_write_kv(randn(2, 4, 7, dtype=torch.float32), randn(2, 2, 7, dtype=torch.float32),
                          randn(2, 2, 7, dtype=torch.float32), cos, sin, cache, cache.clone(), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"cos and sin must be \[T, D\]"):
        ops.rope_write_kv(q, k, k, cos[:1], sin[:1], cache, cache.clone(), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="one cache slot per token"):
        ops.rope_write_kv(q, k, k, cos, sin, cache, cache.clone(), torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match=r"caches must be contiguous \[Hkv, slots, D\]"):
        ops.rope_write_kv(q, k, k, cos, sin, torch.zeros(3, 10, 8), torch.zeros(3, 10, 8), torch.tensor([1, 2]))
