"""Serving benchmark: drive any OpenAI-compatible server over HTTP and measure what users feel.

Random prompts of exactly --input-len token ids (sent as token-id prompts to /v1/completions, so no
re-tokenization changes their length), --output-len tokens out with ignore_eos, --concurrency
requests in flight, each request naming the base or one of --adapters in turn. Streams every answer
and reports output tok/s, time to first token and inter-token latency percentiles as JSON.

    python bench/serve.py --url http://127.0.0.1:8000 --model smollm2 --vocab-size 49152 \
        [--adapters a,b,c] [--num-prompts 64] [--out result.json]
"""

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    model: str
    ok: bool
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]   # noqa: E731
    return {"mean": statistics.fmean(values), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int,
                      headers: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(model, ok=False)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        result.error = repr(e)
        return result
    result.latency = time.perf_counter() - start
    result.ok = result.output_tokens > 0
    return result


async def run(url: str, models: list[str], prompts: list[list[int]], output_len: int, concurrency: int,
              api_key: str | None) -> tuple[list[RequestResult], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def guarded(i: int, prompt: list[int]) -> RequestResult:
            async with gate:
                return await one_request(client, url, models[i % len(models)], prompt, output_len, headers)
        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(i, p) for i, p in enumerate(prompts)))
        return results, time.perf_counter() - start


def benchmark(url: str, model: str, adapters: list[str], vocab_size: int, num_prompts: int = 64,
              input_len: int = 64, output_len: int = 64, concurrency: int = 16, seed: int = 0,
              api_key: str | None = None, warmup: int = 4) -> dict:
    """Run one scenario and return its summary (what the JSON holds)."""
    rng = random.Random(seed)
    # Stay clear of the special tokens that sit at the ends of most vocabularies.
    low, high = min(1000, vocab_size // 10), vocab_size - 1000
    models = adapters or [model]
    # Warm every served model once (at least `warmup` requests): servers load adapters into their slots
    # on first use, and that one-off cost is not throughput.
    warmup = max(warmup, len(models)) if warmup else 0
    prompts = [[rng.randrange(low, high) for _ in range(input_len)] for _ in range(num_prompts + warmup)]
    if warmup:
        asyncio.run(run(url, models, prompts[:warmup], 4, concurrency, api_key))
    results, wall = asyncio.run(run(url, models, prompts[warmup:], output_len, concurrency, api_key))
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    return {
        "url": url, "models": models, "num_prompts": num_prompts, "input_len": input_len,
        "output_len": output_len, "concurrency": concurrency, "completed": len(good),
        "failed": len(results) - len(good), "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall, "output_tok_s": out_tokens / wall,
        "ttft_s": percentiles([r.ttft for r in good]),
        "itl_s": percentiles([x for r in good for x in r.itl]),
        "latency_s": percentiles([r.latency for r in good]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True, help="the base model's served name")
    p.add_argument("--adapters", default="", help="comma-separated adapter names, used round-robin")
    p.add_argument("--vocab-size", type=int, required=True, help="token ids are drawn below this")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    adapters = [a for a in args.adapters.split(",") if a]
    result = benchmark(args.url, args.model, adapters, args.vocab_size, args.num_prompts, args.input_len,
                       args.output_len, args.concurrency, args.seed, args.api_key)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
