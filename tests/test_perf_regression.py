"""A small, fast version of bench/throughput.py run by the suite: ratios measured side by side in one
process, never absolute times. It catches regressions that would sink issue 7's bars (a Python loop
per token, a lost batched path, LoRA falling off its grouped kernels), not noise: each figure is the
best of two interleaved runs, and the floors sit well below what this machine measures at this workload
(engine / transformers 1.6-2.1; mixed / base 0.75 with the C++ multi-LoRA kernel, 0.55-0.58 on the
PyTorch LoRA path). The host is shared: CI runs measured 0.45 when this machine measured 0.55, and 0.48
when it measured 0.75, so the floor stays at 0.4. Whether LoRA really runs through the kernel is checked
exactly, not by timing (test_engine_lora.py, test_lora_parity.py). At 32 new tokens the two engines tied:
prefill weighs too much there for the ratio to mean anything."""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraserve.config import EngineConfig, LoRAConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from loraserve.model.loader import load_model, model_dir

pytestmark = pytest.mark.integration

BATCH, PROMPT, NEW = 16, 64, 64   # issue 7's workload: decode dominates, as in serving


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from throughput import make_bench_adapters

    from loraserve.demo.canary import smollm2_gguf
    gguf = str(smollm2_gguf())
    adapters = make_bench_adapters(model_dir(gguf))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, 40000, (BATCH, PROMPT), generator=g)
    return gguf, adapters, prompts


def engine_tok_s(gguf: str, adapters: dict, prompts: torch.Tensor) -> float:
    model, tok = load_model(gguf, dtype="bfloat16", device="cpu")
    lora = LoRAConfig(enable_lora=bool(adapters), lora_modules=adapters, max_loras=8)
    engine = LLMEngine(EngineConfig(model=gguf, kv_cache_memory_gb=0.25, max_num_seqs=BATCH, lora=lora),
                       model, tok)
    names = list(adapters) or [None]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    engine.generate(prompts[:2].tolist(), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    for i, p in enumerate(prompts.tolist()):
        engine.add_request(f"r{i}", p, params, model=names[i % len(names)])
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return BATCH * NEW / (time.perf_counter() - start)


@torch.inference_mode()
def hf_tok_s(gguf: str, prompts: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir(gguf), dtype=torch.bfloat16).eval()
    kw = {"do_sample": False, "pad_token_id": 0, "top_p": None, "top_k": None, "temperature": None}
    model.generate(prompts[:2, :8], max_new_tokens=2, **kw)
    start = time.perf_counter()
    model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW, min_new_tokens=NEW, **kw)
    return BATCH * NEW / (time.perf_counter() - start)


def test_throughput_ratios_hold(setup):
    gguf, adapters, prompts = setup
    base, mixed, hf = [], [], []
    for _ in range(2):                     # interleaved, best of two: a busy neighbour hurts all alike
        base.append(engine_tok_s(gguf, {}, prompts))
        mixed.append(engine_tok_s(gguf, adapters, prompts))
        hf.append(hf_tok_s(gguf, prompts))
    base_over_hf, mixed_over_base = max(base) / max(hf), max(mixed) / max(base)
    print(f"engine {max(base):.0f} tok/s, 8 adapters {max(mixed):.0f}, transformers generate {max(hf):.0f}")
    assert base_over_hf > 1.0, f"the engine ({max(base):.0f} tok/s) is slower than transformers ({max(hf):.0f})"
    assert mixed_over_base > 0.4, f"8 mixed adapters run at {mixed_over_base:.2f}x the base"
