"""Prepacked oneDNN weights (CPU bf16) give F.linear's results bit for bit, follow changes to their
source weight, and leave the engine's outputs (base and adapters, mixed in a batch) unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.config import EngineConfig, LoRAConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.model.cpu_gemm import PackedLinear, PackedWeight, prepack_linears, supported
from test_engine_lora import adapters, prompts, run  # noqa: F401  (adapters: a fixture)
from tiny_models import IdTokenizer, tiny_model

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(not supported(torch.zeros(1, dtype=BF16)),
                                reason="this CPU's oneDNN has no bf16 GEMM")


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 100])
@pytest.mark.parametrize("in_f,out_f,bias", [(64, 96, False), (96, 64, True), (576, 1344, False), (8, 40, True)])
def test_packed_linear_equals_f_linear_bit_for_bit(rows, in_f, out_f, bias):
    g = torch.Generator().manual_seed(rows * 7 + in_f)
    w = torch.randn(out_f, in_f, generator=g).to(BF16)
    b = torch.randn(out_f, generator=g).to(BF16) if bias else None
    x = torch.randn(1, rows, in_f, generator=g).to(BF16)
    assert torch.equal(PackedWeight().linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("rows", [1, 16, 40])
def test_packed_add_linear_equals_addmm_bit_for_bit(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 32, generator=g).to(BF16)
    x = torch.randn(rows, 32, generator=g).to(BF16)
    x[0] = 0                                            # a base row: y must come back exactly
    y = torch.randn(rows, 200, generator=g).to(BF16)[:, 50:146]     # a strided view, as in the groups
    out = PackedWeight().add_linear(y, x, w)
    assert torch.equal(out, torch.addmm(y, x, w.t()))
    assert torch.equal(out[0], y[0])


def test_stacked_weight_columns_equal_separate_weights():
    """LoRA's projection groups stack q/k/v and the adapters' A: the base columns must not move."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, 64, generator=g).to(BF16) for o in (64, 32, 32, 48)]
    x = torch.randn(16, 64, generator=g).to(BF16)
    stacked = PackedWeight().linear(x, torch.cat(ws))
    separate = torch.cat([F.linear(x, w) for w in ws[:3]], dim=1)
    assert torch.equal(stacked[:, :128], separate)


def test_packed_copy_follows_its_source():
    w = torch.ones(8, 4, dtype=BF16)
    x = torch.ones(2, 4, dtype=BF16)
    pw = PackedWeight()
    assert pw.linear(x, w)[0, 0] == 4
    w.mul_(2)                               # changed in place: repacked
    assert pw.linear(x, w)[0, 0] == 8
    assert pw.linear(x, torch.full((8, 4), 3.0, dtype=BF16))[0, 0] == 12    # replaced: repacked
    assert torch.equal(pw.linear(x.float(), w.float()), F.linear(x.float(), w.float()))  # float32: plain


def test_a_settling_weight_packs_only_after_it_stopped_changing():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, generator=g).to(BF16)
    x = torch.randn(4, 16, generator=g).to(BF16)
    pw = PackedWeight(settle_calls=2)
    for _ in range(2):
        assert torch.equal(pw.linear(x, w), F.linear(x, w)) and pw.packed is None
    assert torch.equal(pw.linear(x, w), F.linear(x, w)) and pw.packed is not None
    w.add_(1)                                   # a slot change: plain again, then packed again
    assert torch.equal(pw.linear(x, w), F.linear(x, w)) and pw.packed is None


def test_prepack_keeps_names_state_and_only_touches_bf16_cpu_linears():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(BF16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4, dtype=BF16)
    before = model(x)
    assert prepack_linears(model) == 2
    assert all(isinstance(m, PackedLinear) and isinstance(m, nn.Linear) for m in (model[0], model[2]))
    assert torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert prepack_linears(nn.Linear(4, 4)) == 0    # float32 stays plain


def bf16_engine(adapters_: dict, prepack: bool, enable_lora: bool = True, cpu_kernels: bool = True) -> LLMEngine:
    model, _ = tiny_model("llama", dtype=BF16)
    cfg = EngineConfig(model="tiny", num_kv_blocks=128, block_size=4, max_num_batched_tokens=16, max_num_seqs=8,
                       prepack_weights=prepack, cpu_kernels=cpu_kernels,
                       lora=LoRAConfig(enable_lora=enable_lora, lora_modules={k: str(v) for k, v in adapters_.items()},
                                       max_loras=4))
    engine = LLMEngine(cfg, model, IdTokenizer())
    assert any(isinstance(m, PackedLinear) for m in engine.model.modules()) == prepack
    return engine


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_bf16_outputs_do_not_depend_on_batch_neighbours_or_packing(adapters, cpu_kernels):  # noqa: F811
    """The bf16 serving path (packed GEMMs, stacked projection groups): the base's tokens equal those
    of an engine with no adapters and of one without LoRA at all (its q/k/v and gate/up fused without
    any A), and an adapter's do not change with what shares its batch, packed or not. With oneDNN
    (`cpu_kernels=False`) packing changes nothing at all; the C++ GEMM, where this CPU has one, sums in
    another order than oneDNN, so its packed engines are only compared with each other."""
    p = prompts(4, seed=5)
    results = []
    for prepack in (True, False):
        kw = dict(prepack=prepack, cpu_kernels=cpu_kernels)
        alone = run(bf16_engine({}, **kw), [(p[0], None)])["r0"]
        assert run(bf16_engine({}, enable_lora=False, **kw), [(p[0], None)])["r0"] == alone
        mixed = run(bf16_engine(adapters, **kw), [(p[0], None), (p[1], "a"), (p[2], "b"), (p[3], "c")])
        assert mixed["r0"] == alone
        a_alone = run(bf16_engine(adapters, **kw), [(p[1], "a")])["r0"]
        assert mixed["r1"] == a_alone
        assert a_alone != run(bf16_engine({}, **kw), [(p[1], None)])["r0"]
        results.append(mixed)
    if not cpu_kernels:
        assert results[0] == results[1]
