"""On a GPU machine: build the engine on CUDA for a model directory in a few configurations and greedy-
decode a batch of 16, printing each configuration's result or its traceback (so one device call says
which part fails, if any) and the mean decode-step time.

    python bench/device/cuda_smoke.py /tmp/smol-random
"""

import sys
import time
import traceback

import torch

from loraserve.config import EngineConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams


def decode(model: str, **overrides) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=model, dtype="bfloat16", device="cuda", max_num_seqs=16, **overrides))
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        engine.add_request(f"r{i}", torch.randint(1000, 30000, (64,), generator=g).tolist(),
                           SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    steps, start, outs = 0, None, {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.output_token_ids
        steps += 1
        if steps == 2:                      # after the prefill and the first decode
            torch.cuda.synchronize()
            start = time.perf_counter()
    torch.cuda.synchronize()
    print(f"  {steps} steps, decode step {(time.perf_counter() - start) / (steps - 2) * 1e3:.2f} ms, "
          f"device {engine.device}")
    return [outs[f"r{i}"] for i in range(16)]


def main() -> None:
    model = sys.argv[1]
    results = {}
    for name, overrides in [("default", {}), ("hf-forward", {"lean_forward": False})]:
        print(f"== {name}")
        try:
            results[name] = decode(model, **overrides)
            print("  ok; first row:", results[name][0][:8])
        except Exception:
            traceback.print_exc()
    if "default" in results and "hf-forward" in results:
        # With PyTorch's ops the lean forward is transformers' arithmetic: the same tokens, bit for bit.
        print("lean forward tokens == transformers forward tokens:", results["default"] == results["hf-forward"])


if __name__ == "__main__":
    main()
