"""Many more adapters than device slots and host memory: 40 adapters (20 from start-up flags, 20 loaded
over HTTP), --max-loras 4, --max-cpu-loras 8, concurrent mixed requests; every answer equals PeftModel's
for its own adapter, and the tiers stay within their bounds."""

import copy
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lora_fixtures import randomize
from loraserve.config import LoRAConfig
from loraserve.engine.async_engine import AsyncEngine
from server_fixtures import ServerThread, build_tiny_llama, tiny_engine_config
from test_runtime_lora_http import metric

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

N_ADAPTERS, MAX_LORAS, MAX_CPU_LORAS, MAX_TOKENS = 40, 4, 8, 6
SHAPES = [dict(r=4, target_modules="all-linear"), dict(r=2, target_modules=["q_proj", "v_proj"]),
          dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["o_proj", "down_proj"]),
          dict(r=4, lora_alpha=4, target_modules=["k_proj", "up_proj"])]


def greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_forty_adapters_four_slots_eight_in_host_memory_every_answer_exact(tmp_path_factory):
    model_dir = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-llama")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("many")
    rng = random.Random(0)
    prompts = {f"a{i}": [rng.randrange(1, 40000) for _ in range(rng.randrange(3, 12))] for i in range(N_ADAPTERS)}
    prompts[None] = [1, 2, 3, 4, 5]
    want = {None: greedy(base, prompts[None])}
    peft_models = [get_peft_model(copy.deepcopy(base), LoraConfig(**shape)).eval() for shape in SHAPES]
    for i in range(N_ADAPTERS):          # PeftModel is the oracle, then saves exactly what it computed with
        model = peft_models[i % len(SHAPES)]
        randomize(model, seed=100 + i)
        model.save_pretrained(str(root / f"a{i}"))
        want[f"a{i}"] = greedy(model, prompts[f"a{i}"])

    at_start = {f"a{i}": str(root / f"a{i}") for i in range(N_ADAPTERS // 2)}
    lora = LoRAConfig(enable_lora=True, lora_modules=at_start, max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS)
    engine = AsyncEngine(tiny_engine_config(model_dir, lora=lora))
    with ServerThread(engine, allow_runtime_lora=True, lora_roots=[str(root)]) as server, \
            httpx.Client(base_url=server.url, timeout=120) as http:
        for i in range(N_ADAPTERS // 2, N_ADAPTERS):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": f"a{i}"})
            assert r.status_code == 200, r.text

        def ask(name: str | None) -> tuple[str | None, list[int]]:
            r = http.post("/v1/completions", json={
                "model": name or "tiny-llama", "prompt": prompts[name], "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True})
            assert r.status_code == 200, r.text
            return name, [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]

        order = [f"a{i}" for i in range(N_ADAPTERS)] * 2 + [None] * 8
        rng.shuffle(order)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, order))
        wrong = [name for name, got in answers if got != want[name]]
        assert not wrong, f"answers differ from PEFT for {wrong}"

        assert metric(server.url, "loraserve:lora_loads_total", {"kind": "reload", "result": "success"}) > 0
        manager = engine.engine.lora
        assert len(manager.names()) == N_ADAPTERS and len(manager.adapters) <= MAX_CPU_LORAS
        assert sum(manager.pins.values()) == 0 and all(e.users == 0 for e in manager.entries.values())
