"""q/k/v and gate/up fused into one GEMM (model/fused_linear.py) give each member's own output bit for
bit, keep the model's names and state, and still answer a member called with a different input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.model.cpu_gemm import PackedWeight, prepack_linears, supported
from loraserve.model.fused_linear import FusedLinearGroup, GroupedLinear, fuse_sibling_linears
from tiny_models import tiny_model

BF16 = torch.bfloat16
DTYPES = [torch.float32] + ([BF16] if supported(torch.zeros(1, dtype=BF16)) else [])


def attention_like(bias: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.q_proj, m.k_proj, m.v_proj = nn.Linear(64, 64, bias), nn.Linear(64, 16, bias), nn.Linear(64, 16, bias)
    m.o_proj = nn.Linear(64, 64, bias)
    return m.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])     # Qwen2 has q/k/v biases
@pytest.mark.parametrize("packed", [False, True])
def test_fused_members_equal_their_own_linears_bit_for_bit(dtype, bias, packed):
    m = attention_like(bias, dtype)
    names = ["q_proj", "k_proj", "v_proj"]
    weights = {n: (getattr(m, n).weight.clone(), getattr(m, n).bias) for n in names}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    if packed:
        prepack_linears(m)
    assert fuse_sibling_linears(m) == 1
    assert all(type(getattr(m, n)) is GroupedLinear and isinstance(getattr(m, n), nn.Linear) for n in names)
    assert type(m.o_proj) is not GroupedLinear                  # not a sibling: left alone
    assert m.state_dict().keys() == state.keys() and all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    for rows in (1, 7, 16):
        x = torch.randn(1, rows, 64).to(dtype)
        outs = [getattr(m, n)(x) for n in names]                  # the first call computes all three
        for n, out in zip(names, outs):
            w, b = weights[n]
            assert torch.equal(out, F.linear(x, w, None if b is None else b.detach()))
        # Column views of the one GEMM's output, not copies: consumers read rows that lie apart.
        assert len({o.untyped_storage().data_ptr() for o in outs}) == 1


def test_a_member_called_with_another_input_computes_again():
    m = attention_like(False, torch.float32)
    fuse_sibling_linears(m)
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    q = m.q_proj(x)
    k_y = m.k_proj(y)          # not the tensor q_proj saw: its pending k must not be handed out
    assert torch.equal(k_y, F.linear(y, m.k_proj.weight))
    assert torch.equal(q, F.linear(x, m.q_proj.weight))


def test_members_are_views_of_one_stack_and_mismatched_siblings_stay_apart():
    m = attention_like(False, torch.float32)
    fuse_sibling_linears(m)
    group = m.q_proj.group
    assert isinstance(group, FusedLinearGroup) and group.weight.shape == (96, 64)
    assert m.k_proj.weight.data_ptr() == group.weight[64:].data_ptr()     # no second copy of the weights
    odd = attention_like(False, torch.float32)
    odd.v_proj = nn.Linear(32, 16)                                         # another input size: not siblings
    assert fuse_sibling_linears(odd) == 0


def test_every_layer_of_a_model_is_fused_once():
    model, ref = tiny_model("llama")
    assert fuse_sibling_linears(model) == 2 * model.config.num_hidden_layers   # q/k/v and gate/up per layer
    assert fuse_sibling_linears(model) == 0                                    # already grouped
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_siblings_off_the_cpu_keep_their_own_gemms():
    """cuBLAS may give stacked columns other last bits than the separate GEMMs (seen on an H200): off the
    CPU nothing is fused, so the base model's outputs stay transformers' own. A meta-device model stands
    in for CUDA here; tests on a GPU machine run the parity tests there (bench/device/run.sh)."""
    assert fuse_sibling_linears(attention_like(False, torch.bfloat16).to("meta")) == 0
    assert fuse_sibling_linears(attention_like(False, torch.bfloat16)) == 1


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("meta", torch.bfloat16)])
def test_prepack_packs_only_where_linear_uses_the_packed_copy(device, dtype):
    """oneDNN packs CPU bf16 only: a float32 weight (no use for a copy) or a CUDA one (its reorder op does
    not exist there: the engine crashed at start-up on an H200) is left alone."""
    weight = torch.randn(32, 64, dtype=dtype, device=device)
    packed = PackedWeight()
    packed.prepack(weight)
    assert packed.packed is None
