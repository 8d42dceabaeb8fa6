"""Adapters loaded, unloaded and moved between tiers while the engine serves: host memory bounded by
max_cpu_loras (LRU, re-read on a miss, pinned adapters never evicted), unloading that lets waiting and
running requests finish with the adapter they started with, and a name re-used meanwhile."""

import copy
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lora_fixtures import make_adapter, randomize
from loraserve.config import EngineConfig, LoRAConfig
from loraserve.engine.llm_engine import LLMEngine, LoRANotEnabled, UnknownModelError
from loraserve.engine.sampling_params import SamplingParams
from loraserve.lora import LoRAManager
from loraserve.lora.manager import AdapterChanged, AdapterConflict
from test_engine_lora import ALL_LINEAR, GREEDY, prompts, run
from tiny_models import IdTokenizer, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    _, base = tiny_model("llama")
    root = tmp_path_factory.mktemp("runtime")
    targets = [ALL_LINEAR, ["q_proj", "v_proj"], ["o_proj", "down_proj"]]
    return {f"a{i}": make_adapter(base, root / f"a{i}", seed=10 + i, r=2 + i % 3, target_modules=targets[i % 3])
            for i in range(6)}


def lora_engine(adapters: dict, max_loras: int = 4, max_cpu_loras: int | None = None, enable_lora: bool = True,
                **overrides) -> LLMEngine:
    model, _ = tiny_model("llama")
    lora = LoRAConfig(enable_lora=enable_lora, lora_modules={k: str(v) for k, v in adapters.items()},
                      max_loras=max_loras, max_cpu_loras=max_cpu_loras)
    cfg = {"model": "tiny", "num_kv_blocks": 128, "block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 8,
           "lora": lora, **overrides}
    return LLMEngine(EngineConfig(**cfg), model, IdTokenizer())


def peft_greedy(path, prompt: list[int], n: int = GREEDY.max_tokens) -> list[int]:
    """PeftModel's own greedy continuation: the oracle for every adapter answer here."""
    _, base = tiny_model("llama")
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval() if path else base
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_host_tier_bounded_lru_rereads_and_stays_exact(paths):
    engine = lora_engine(paths, max_loras=2, max_cpu_loras=2)
    loads = []
    engine.lora.on_load = lambda kind, seconds: loads.append((kind, seconds is not None))
    assert list(engine.lora.adapters) == ["a4", "a5"]          # the last two loaded stay in host memory
    names = [None, "a0", "a1", "a2", "a3", "a4", "a5", "a0", "a3"]
    reqs = list(zip(prompts(len(names)), names))
    done = run(engine, reqs)
    for i, (prompt, name) in enumerate(reqs):
        assert done[f"r{i}"] == peft_greedy(paths.get(name), prompt), f"request {i} ({name})"
    assert ("reload", True) in loads and all(ok for _, ok in loads)
    assert len(engine.lora.adapters) <= 2
    assert sum(engine.lora.pins.values()) == 0 and all(e.users == 0 for e in engine.lora.entries.values())


def test_pinned_adapters_are_never_evicted_from_host_memory(paths):
    model, _ = tiny_model("llama")
    manager = LoRAManager(model, max_loras=2, max_cpu_loras=2)
    for name in ("a0", "a1", "a2"):
        manager.load(name, str(paths[name]))
    assert list(manager.adapters) == ["a1", "a2"]
    manager.activate("a1")
    manager.activate("a2")
    manager.load("a3", str(paths["a3"]))     # host memory is full of pinned adapters: a3 waits on disk
    assert list(manager.adapters) == ["a1", "a2"] and manager.names() == ["a0", "a1", "a2", "a3"]
    assert manager.try_activate("a3") is None
    manager.release("a1")
    slot = manager.activate("a3")            # a1 is free now: it leaves host memory and its slot
    assert set(manager.adapters) == {"a2", "a3"} and manager.slot_of("a1") is None and manager.slot_of("a3") == slot


def test_max_cpu_loras_below_max_loras_is_refused():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be at least max_loras \(2\)"):
        LoRAManager(model, max_loras=2, max_cpu_loras=1)


def test_adapter_changed_on_disk_is_refused_on_reread_and_others_keep_serving(paths, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for src, dst in ((paths["a0"], a), (paths["a1"], b)):
        dst.mkdir()
        for f in os.listdir(src):
            (dst / f).write_bytes((src / f).read_bytes())
    engine = lora_engine({"a": a, "b": b}, max_loras=1, max_cpu_loras=1)
    assert list(engine.lora.adapters) == ["b"]               # a lives on disk only
    tensors = load_file(a / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in tensors.items()}, a / "adapter_model.safetensors")
    p = prompts(2, seed=3)
    engine.add_request("bad", p[0], SamplingParams(**vars(GREEDY)), model="a")
    engine.add_request("good", p[1], SamplingParams(**vars(GREEDY)), model="b")
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o.prompt_token_ids + o.output_token_ids for o in engine.step() if o.finished})
    (rid, err), = engine.failed
    assert rid == "bad" and isinstance(err, AdapterChanged) and "changed on disk since it was loaded" in str(err)
    assert outputs == {"good": peft_greedy(b, p[1])}
    assert engine.lora.entries["a"].users == 0 and engine.blocks.num_free == engine.blocks.num_blocks


def test_unload_lets_waiting_and_running_requests_finish_with_the_adapter(paths):
    engine = lora_engine({"a": paths["a0"]}, max_num_seqs=1)
    p = prompts(2, seed=4)
    engine.add_request("running", p[0], SamplingParams(**vars(GREEDY)), model="a")
    engine.add_request("waiting", p[1], SamplingParams(**vars(GREEDY)), model="a")
    outputs = {}
    for _ in range(3):
        engine.step()
    assert engine.unload_lora("a") == 2
    assert engine.model_names() == ["tiny"]
    with pytest.raises(UnknownModelError, match="Served models: tiny"):
        engine.add_request("late", p[0], GREEDY, model="a")
    while engine.has_unfinished():
        outputs.update({o.request_id: o.prompt_token_ids + o.output_token_ids for o in engine.step() if o.finished})
    assert outputs == {"running": peft_greedy(paths["a0"], p[0]), "waiting": peft_greedy(paths["a0"], p[1])}
    assert engine.lora.entries == {} and engine.lora.adapters == {} and engine.lora.slot_owner == [None] * 4


def test_name_reused_while_the_unloaded_adapter_finishes(paths):
    engine = lora_engine({"a": paths["a0"]})
    p = prompts(2, seed=5)
    engine.add_request("old", p[0], SamplingParams(**vars(GREEDY)), model="a")
    engine.step()
    engine.unload_lora("a")
    report, created = engine.load_lora("a", str(paths["a1"]))
    assert created and report.path == str(paths["a1"])
    engine.add_request("new", p[1], SamplingParams(**vars(GREEDY)), model="a")
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o.prompt_token_ids + o.output_token_ids for o in engine.step() if o.finished})
    assert outputs == {"old": peft_greedy(paths["a0"], p[0]), "new": peft_greedy(paths["a1"], p[1])}
    (key,) = engine.lora.entries                      # only the new load is left
    assert key != "a" and LoRAManager.name_of(key) == "a" and engine.lora.resolve("a") == key


def test_runtime_load_is_idempotent_for_the_same_path_and_refuses_conflicts(paths):
    engine = lora_engine({"a": paths["a0"]})
    report, created = engine.load_lora("a", str(paths["a0"]) + "/")
    assert not created and report is engine.lora.reports["a"]
    with pytest.raises(AdapterConflict, match=f"already loaded \\(from {paths['a0']}\\)"):
        engine.load_lora("a", str(paths["a1"]))
    with pytest.raises(AdapterConflict, match="base model's name"):
        engine.load_lora("tiny", str(paths["a1"]))
    with pytest.raises(LoRANotEnabled, match="--enable-lora"):
        lora_engine({}, enable_lora=False).load_lora("b", str(paths["a1"]))


def test_two_hundred_adapters_four_slots_eight_in_host_memory(tmp_path):
    """Hundreds of registered adapters: each request still gets exactly its own adapter, the host tier
    stays at max_cpu_loras, and every request frees what it held."""
    _, base = tiny_model("llama")
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "down_proj"])).eval()
    paths, want, p = {}, {}, prompts(200, seed=6)
    for i in range(200):
        randomize(peft, seed=1000 + i)
        paths[f"n{i}"] = tmp_path / f"n{i}"
        peft.save_pretrained(str(paths[f"n{i}"]))
        prompt = p[i][:6]
        with torch.no_grad():
            ids = list(prompt)
            for _ in range(GREEDY.max_tokens):
                ids.append(int(peft(torch.tensor([ids])).logits[0, -1].argmax()))
        want[f"n{i}"] = (prompt, ids)
    engine = lora_engine(paths, max_loras=4, max_cpu_loras=8)
    names = [f"n{i}" for i in range(0, 200, 3)]
    done = run(engine, [(want[n][0], n) for n in names])
    assert [done[f"r{i}"] for i in range(len(names))] == [want[n][1] for n in names]
    assert len(engine.lora.names()) == 200 and len(engine.lora.adapters) == 8
    assert sum(engine.lora.pins.values()) == 0 and all(e.users == 0 for e in engine.lora.entries.values())


def test_unloaded_adapter_is_held_in_memory_for_its_waiting_requests(paths, tmp_path):
    """An adapter evicted to disk and unloaded while a request waits for it: the unload reads it back
    into memory, so deleting its directory afterwards cannot break that request."""
    a = tmp_path / "a"
    a.mkdir()
    for f in os.listdir(paths["a2"]):
        (a / f).write_bytes((paths["a2"] / f).read_bytes())
    engine = lora_engine({"a": a, "b": paths["a3"]}, max_loras=1, max_cpu_loras=1)
    assert list(engine.lora.adapters) == ["b"]
    p = prompts(1, seed=7)[0]
    engine.add_request("waiting", p, SamplingParams(**vars(GREEDY)), model="a")
    assert engine.unload_lora("a") == 1 and "a" in engine.lora.adapters
    for f in os.listdir(a):
        os.remove(a / f)
    a.rmdir()
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o.prompt_token_ids + o.output_token_ids for o in engine.step() if o.finished})
    assert outputs == {"waiting": peft_greedy(paths["a2"], p)} and engine.failed == []
    assert list(engine.lora.entries) == ["b"]
