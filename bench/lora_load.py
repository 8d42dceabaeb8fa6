"""Runtime adapter loading on real SmolLM2-135M-Instruct (bf16), through a real `loraserve serve` process:

  - hot load: POST /v1/load_lora_adapter of a rank-16 adapter on every linear module, 20 different
    adapters one after the other, timed at the client (the endpoint's whole path: HTTP, path check,
    read + validate on the engine thread); median against the 50 ms bar. Also the first 1-token
    request to each fresh adapter (which places it in a device slot) against one to a resident adapter.
  - ready time: process start to /health answering, with 8 such adapters on --lora-modules against the
    base alone (no LoRA), alternating, median of --repeats each; bar 1.1x.

Writes bench/results/lora_load.json and prints a summary.

    python bench/lora_load.py [--repeats 5]
"""

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraserve.demo.canary import smollm2_gguf
from loraserve.model.loader import cache_dir, model_dir

RANK, N_LOADS, N_START = 16, 20, 8
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).parent / "results"


def make_adapters(base_dir: Path, n: int) -> Path:
    """n rank-16 all-linear PEFT adapters with random (trained-looking) B, under one root; built once."""
    root = cache_dir() / "bench-lora-load"
    if all((root / f"r16-{i}" / "adapter_config.json").exists() for i in range(n)):
        return root
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=ALL_LINEAR))
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(str(root / f"r16-{i}"))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(*flags: str):
    """A `loraserve serve` process on SmolLM2; yields (url, seconds from spawn to /health answering)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraserve.cli", "serve", str(smollm2_gguf()), "--port", str(port),
         "--served-model-name", "smollm2", "--device", "cpu", "--uvicorn-log-level", "warning", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.02)
        yield url, time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def one_token(http: httpx.Client, model: str) -> float:
    start = time.perf_counter()
    r = http.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - start


def hot_load(root: Path) -> dict:
    with serve("--enable-lora", "--max-loras", "8", "--allow-runtime-lora", "--lora-root", str(root)) as (url, _), \
            httpx.Client(base_url=url, timeout=60) as http:
        one_token(http, "smollm2")                      # warm the first forward
        client_s, server_s, first_request_s, warm_request_s = [], [], [], []
        for i in range(N_LOADS):
            start = time.perf_counter()
            r = http.post("/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": f"r16-{i}"})
            client_s.append(time.perf_counter() - start)
            r.raise_for_status()
            server_s.append(r.json()["adapter"]["load_seconds"])
            first_request_s.append(one_token(http, f"a{i}"))
            warm_request_s.append(one_token(http, f"a{i}"))
        report = r.json()["adapter"]
    return {
        "adapter": {k: report[k] for k in ("ranks", "modules_by_type", "num_tensors", "num_params")},
        "loads": N_LOADS,
        "load_ms_median": 1000 * statistics.median(client_s),
        "load_ms_all": [round(1000 * s, 2) for s in client_s],
        "server_read_validate_ms_median": 1000 * statistics.median(server_s),
        "first_request_ms_median": 1000 * statistics.median(first_request_s),
        "resident_request_ms_median": 1000 * statistics.median(warm_request_s),
        "bar_ms": 50,
    }


def ready_time(root: Path, repeats: int) -> dict:
    with_adapters = ["--enable-lora", "--max-loras", "8", "--lora-modules",
                     *(f"a{i}={root / f'r16-{i}'}" for i in range(N_START))]
    base_s, lora_s = [], []
    for _ in range(repeats):                    # alternate, so drifting machine load hits both alike
        with serve() as (_, seconds):
            base_s.append(seconds)
        with serve(*with_adapters) as (_, seconds):
            lora_s.append(seconds)
    return {
        "adapters": N_START,
        "repeats": repeats,
        "base_s_median": statistics.median(base_s),
        "with_adapters_s_median": statistics.median(lora_s),
        "ratio": statistics.median(lora_s) / statistics.median(base_s),
        "base_s_all": [round(s, 3) for s in base_s],
        "with_adapters_s_all": [round(s, 3) for s in lora_s],
        "bar_ratio": 1.1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="start-ups of each kind for the ready time")
    args = parser.parse_args()
    base_dir = model_dir(str(smollm2_gguf()))          # converts the GGUF once, before anything is timed
    root = make_adapters(base_dir, N_LOADS)
    load_before = os.getloadavg()
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_before": load_before},
        "hot_load": hot_load(root),
        "ready_time": ready_time(root, args.repeats),
    }
    result["machine"]["loadavg_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_load.json").write_text(json.dumps(result, indent=2))
    h, r = result["hot_load"], result["ready_time"]
    print(f"hot load, rank {RANK} all-linear, median of {N_LOADS}: {h['load_ms_median']:.1f} ms at the client "
          f"({h['server_read_validate_ms_median']:.1f} ms read + validate); bar {h['bar_ms']} ms")
    print(f"first 1-token request to a fresh adapter {h['first_request_ms_median']:.1f} ms, "
          f"to a resident one {h['resident_request_ms_median']:.1f} ms")
    print(f"ready time: base {r['base_s_median']:.2f} s, with {N_START} adapters {r['with_adapters_s_median']:.2f} s, "
          f"ratio {r['ratio']:.3f}; bar {r['bar_ratio']}x")
    print(f"load average before / after: {load_before} / {result['machine']['loadavg_after']}")


if __name__ == "__main__":
    main()
