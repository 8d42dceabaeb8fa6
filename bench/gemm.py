"""The bf16 linear layers of one SmolLM2-135M forward step, C++ GEMM (model/csrc/gemm.cpp) against oneDNN
with prepacked weights (the baseline, run side by side in the same process): q/k/v, o, gate/up and down of
30 layers plus the 49,152-row lm_head, random weights of the real shapes, one thread, caches flushed
before each pass so the weights come from memory as in a served step. Best of --repeats passes.

Writes bench/results/gemm.json and prints a table.

    python bench/gemm.py [--rows 1 16 79 512] [--repeats 3]
"""

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import torch

from loraserve.model import kernels

RESULTS = Path(__file__).parent / "results"
LAYERS = 30
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}


def onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def one_pass(linear, x: torch.Tensor, packed: list[torch.Tensor]) -> float:
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)          # push the weights out of the caches
    start = time.perf_counter()
    for w in packed:
        linear(x, w)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 79, 512])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    gemm = kernels.gemm()
    if gemm is None:
        raise SystemExit("no C++ GEMM here (no AVX512-BF16 or no compiler): nothing to compare")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": {}}
    for rows in args.rows:
        per_shape = {}
        for name, (k, n) in SHAPES.items():
            count = 1 if name == "lm_head" else LAYERS
            weights = [torch.randn(n, k, generator=g).to(torch.bfloat16) for _ in range(count)]
            onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
            ours = [gemm.pack(w) for w in weights]
            x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
            t_onednn = min(one_pass(onednn_linear, x, onednn) for _ in range(args.repeats))
            t_ours = min(one_pass(functools.partial(gemm.linear, out_features=n), x, ours) for _ in range(args.repeats))
            per_shape[name] = {"onednn_ms": 1e3 * t_onednn, "cpp_gemm_ms": 1e3 * t_ours}
        total = {key: sum(s[key] for s in per_shape.values()) for key in ("onednn_ms", "cpp_gemm_ms")}
        total["speedup"] = total["onednn_ms"] / total["cpp_gemm_ms"]
        result["rows"][rows] = {"shapes": per_shape, "step": total}
        print(f"{rows:4d} rows: one step's linears, oneDNN {total['onednn_ms']:7.2f} ms, "
              f"C++ GEMM {total['cpp_gemm_ms']:7.2f} ms, {total['speedup']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gemm.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
