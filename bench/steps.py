"""Decode-step A/B in one process: a base engine and an engine with 8 mixed adapters, their steps
alternated one by one, so a noisy host slows both alike (on a shared 2-core VM the same GEMM measured
48 and 90 GFLOP/s minutes apart, bench/README.md session 10: served runs minutes apart cannot see a few
percent). Same model and adapters as bench/throughput.py; 16 sequences, prompts prefilled before
timing starts, then N decode steps each. Writes bench/results/steps.json.

    python bench/steps.py [--steps 100] [--threads 1]
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import RESULTS, make_bench_adapters  # noqa: E402

from loraserve.config import EngineConfig, LoRAConfig  # noqa: E402
from loraserve.demo.canary import smollm2_gguf  # noqa: E402
from loraserve.engine.llm_engine import LLMEngine  # noqa: E402
from loraserve.engine.sampling_params import SamplingParams  # noqa: E402
from loraserve.model.loader import load_model, model_dir  # noqa: E402

BATCH, PROMPT = 16, 64


def decoding_engine(gguf: str, adapters: dict[str, str], steps: int, threads: int) -> LLMEngine:
    """An engine holding BATCH sequences that have all finished their prompts (one adapter each, round-robin)."""
    model, tok = load_model(gguf, dtype="bfloat16", device="cpu")
    lora = LoRAConfig(enable_lora=bool(adapters), lora_modules=adapters, max_loras=8)
    config = EngineConfig(model=gguf, kv_cache_memory_gb=0.25, max_num_seqs=BATCH, lora=lora, num_threads=threads,
                          max_num_batched_tokens=BATCH * PROMPT)      # every prompt in the first step
    engine = LLMEngine(config, model, tok)
    names = list(adapters) or [None]
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    prompts = torch.randint(1000, 40000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0)).tolist()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params, model=names[i % len(names)])
    for _ in range(3):
        engine.step()
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="engine threads (1: the serving default on 2 cores, "
                   "with the kernels' helper thread)")
    p.add_argument("--out", default=str(RESULTS / "steps.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gguf = str(smollm2_gguf())
    base = decoding_engine(gguf, {}, args.steps, args.threads)
    mixed = decoding_engine(gguf, make_bench_adapters(model_dir(gguf)), args.steps, args.threads)
    gc.collect()
    gc.freeze()                      # as the server does after start-up (engine/async_engine.py)
    times: dict[str, list[float]] = {"base": [], "mixed": []}
    for i in range(args.steps):
        order = [("base", base), ("mixed", mixed)]
        for name, engine in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - start)
    paired = sorted(b / m for b, m in zip(times["base"], times["mixed"]))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "threads": args.threads,
        "base_step_ms_p50": statistics.median(times["base"]) * 1e3,
        "mixed_step_ms_p50": statistics.median(times["mixed"]) * 1e3,
        "mixed_over_base_paired_p50": paired[len(paired) // 2],   # step time ratio = throughput ratio
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
