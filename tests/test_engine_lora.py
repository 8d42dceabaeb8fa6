"""Adapters through the whole engine: mixed adapters and the base in the same packed steps (chunked
prefill and decodes), each row's logits equal PEFT's for its own adapter, and the base's tokens are
bit-identical whichever adapters are loaded or share its batch."""

import copy
import os
import shutil

import pytest
import torch
from peft import PeftModel

from lora_fixtures import make_adapter
from loraserve.config import EngineConfig, LoRAConfig
from loraserve.engine.llm_engine import LLMEngine, UnknownModelError
from loraserve.engine.sampling_params import SamplingParams
from loraserve.lora.adapter import AdapterError
from loraserve.model.arena import hugepages_supported
from loraserve.model.cpu_gemm import supported
from test_engine_parity import record_logits
from tiny_models import TEST_DEVICE, VOCAB, IdTokenizer, tiny_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    _, base = tiny_model("llama")
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(base, root / "a", seed=1, r=4, target_modules=ALL_LINEAR),
        "b": make_adapter(base, root / "b", seed=2, r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
        "c": make_adapter(base, root / "c", seed=3, r=2, use_rslora=True, target_modules=["o_proj", "down_proj"]),
    }


def lora_engine(adapters: dict, max_loras: int = 4, dtype: torch.dtype = torch.float32, **overrides) -> LLMEngine:
    model, _ = tiny_model("llama")
    model.to(dtype)
    cfg = {"model": "tiny", "num_kv_blocks": 128, "block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 8,
           "lora": LoRAConfig(enable_lora=True, lora_modules={k: str(v) for k, v in adapters.items()},
                              max_loras=max_loras)}
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), model, IdTokenizer())


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (5 + 4 * i,), generator=g).tolist() for i in range(n)]


def run(engine: LLMEngine, reqs: list[tuple[list[int], str | None]]) -> dict[str, list[int]]:
    for i, (p, model) in enumerate(reqs):
        engine.add_request(f"r{i}", p, SamplingParams(**vars(GREEDY)), model=model)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.prompt_token_ids + o.output_token_ids for o in engine.step() if o.finished})
    return done


def kernel_and_cores() -> bool:
    """Whether engines here use the C++ multi-LoRA kernel, and with one engine thread its helper thread."""
    return bool(shutil.which("c++") or shutil.which("g++")) and TEST_DEVICE.type == "cpu"


@pytest.mark.parametrize("max_loras, threads", [(4, None), (2, None), (4, 1)])   # 2 slots for 3 adapters:
def test_mixed_adapters_match_peft(adapters, max_loras, threads):                 # requests wait for a slot
    """threads=1: one engine thread, so the deltas run on the kernel's helper thread beside each base GEMM."""
    engine = lora_engine(adapters, max_loras=max_loras, num_threads=threads)
    beside = threads == 1 and kernel_and_cores() and len(os.sched_getaffinity(0)) >= 2
    assert all(g.deltas_beside == beside for g in engine.lora.groups)
    assert engine.model_names() == ["tiny", "a", "b", "c"]
    batches = []
    seen = record_logits(engine, batches)
    names = [None, "a", "b", "c", "a", None, "c", "b"]
    reqs = list(zip(prompts(len(names)), names))
    done = run(engine, reqs)
    _, base = tiny_model("llama")
    oracles = {None: base}
    oracles.update({k: PeftModel.from_pretrained(copy.deepcopy(base), str(v)).eval() for k, v in adapters.items()})
    with torch.no_grad():
        for i, (_, name) in enumerate(reqs):
            tokens = done[f"r{i}"]
            ref = oracles[name](torch.tensor([tokens], device=base.device)).logits[0]
            rows = [(n, lg) for r, n, lg in seen if r == f"r{i}"]
            assert len(rows) == GREEDY.max_tokens
            for n, lg in rows:
                diff = (lg - ref[n - 1]).abs().max().item()
                assert diff < 1e-4, f"request {i} ({name}) at position {n - 1}: max abs diff {diff}"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert sum(engine.lora.pins.values()) == 0


@pytest.mark.parametrize("dtype, threads", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 1)])
def test_base_and_adapter_outputs_do_not_depend_on_batch_neighbours(adapters, dtype, threads):
    """Through the C++ multi-LoRA kernel where it builds (bf16 takes its vdpbf16ps path on CPUs with it);
    threads=1: its deltas on the helper thread, beside the base GEMMs."""
    p = prompts(4, seed=5)
    alone = run(lora_engine({}, dtype=dtype), [(p[0], None)])["r0"]
    mixed = lora_engine(adapters, dtype=dtype, num_threads=threads)
    with_neighbours = run(mixed, [(p[0], None), (p[1], "a"), (p[2], "b"), (p[3], "c")])
    if mixed.device.type == "cpu" and (shutil.which("c++") or shutil.which("g++")):   # "a" is on every linear:
        # every group bound its kernel
        assert mixed.lora.groups and all(g.kernel_group is not None for g in mixed.lora.groups)
        if hugepages_supported():                     # and reads the adapters from huge-page memory
            assert all(g.arena.holds(m.lora_a) and g.arena.holds(g.b_tiles[id(m)][1])
                       for g in mixed.lora.groups for m in g.members)
    assert with_neighbours["r0"] == alone
    a_alone = run(lora_engine(adapters, dtype=dtype), [(p[1], "a")])["r0"]
    a_with_others = run(lora_engine(adapters, dtype=dtype, num_threads=threads),
                        [(p[2], "c"), (p[1], "a"), (p[3], "b"), (p[0], None), (p[1], "a")])
    assert a_with_others["r1"] == a_alone
    assert a_with_others["r4"] == a_alone          # two rows of one adapter share the kernel's blocks
    assert a_alone != run(lora_engine({}, dtype=dtype), [(p[1], None)])["r0"]    # the adapter does change it


def test_unknown_adapter_name_lists_served_models(adapters):
    engine = lora_engine(adapters)
    with pytest.raises(UnknownModelError, match="Served models: tiny, a, b, c"):
        engine.add_request("x", [1, 2, 3], GREEDY, model="d")


def test_bad_adapters_stop_start_up_and_are_all_named(adapters, tmp_path):
    _, base = tiny_model("llama")
    untrained = make_adapter(base, tmp_path / "untrained", randomize_weights=False)
    with pytest.raises(AdapterError) as err:
        lora_engine({"good": adapters["a"], "zero": untrained, "missing": tmp_path / "nope"})
    message = str(err.value)
    assert "zero" in message and "missing" in message and "good (" not in message


def test_load_report_measures_each_adapters_effect_like_peft(adapters):
    """The report's measured effect is KL(adapter || base) of the next token on the probe prompt, taken
    through the serving path: it equals the same KL computed with PeftModel."""
    engine = lora_engine(adapters, max_loras=2)           # 3 adapters, 2 slots: measured in two forwards
    assert engine.measure_pending_effects() and not engine.measure_pending_effects()
    _, base = tiny_model("llama")
    probe = torch.tensor([engine.probe_ids], device=base.device)
    with torch.no_grad():
        base_lp = torch.log_softmax(base(probe).logits[0, -1], dim=-1)
        for name, path in adapters.items():
            peft = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
            lp = torch.log_softmax(peft(probe).logits[0, -1], dim=-1)
            want = torch.sum(lp.exp() * (lp - base_lp)).item()
            got = engine.lora.reports[name].next_token_kl
            assert got is not None and want > 1e-4
            assert abs(got - want) < 1e-4 + 1e-3 * want, f"{name}: report {got}, PEFT {want}"
    assert engine.blocks.num_free == engine.blocks.num_blocks and sum(engine.lora.pins.values()) == 0


def test_groups_are_stacked_and_packed_at_start_up(adapters):
    """The stacked base weights (and their oneDNN copies) are built with the engine, not inside the first
    requests: ~400 MB of fresh memory for SmolLM2, which made the first served steps fault and stall."""
    engine = lora_engine(adapters, dtype=torch.bfloat16)
    groups = engine.lora.groups
    if engine.lora.kernel is None:
        pytest.skip("no C++ kernel here: the PyTorch path stacks once the adapters' ranks are known")
    assert groups and all(g.w_cat is not None and not g.stale for g in groups)
    if not supported(groups[0].w_cat):
        pytest.skip("no oneDNN bf16 here: nothing is packed")
    packed = [g.packed_w.packed for g in groups]
    assert all(p is not None for p in packed)
    run(engine, [(p, name) for p, name in zip(prompts(4), [None, "a", "b", "c"])])
    assert all(g.packed_w.packed is p for g, p in zip(groups, packed))   # adapters entering slots repack nothing
