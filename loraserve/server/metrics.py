"""Prometheus metrics under vLLM's names, so dashboards and gateway routers built for vLLM read
loraserve unchanged. Each app gets its own registry: several servers (tests, or one process
serving twice) never collide on metric names."""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_LOAD_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class _EngineStatsCollector(Collector):
    """Reads the engine's queue and KV-cache state at scrape time, so the gauges are never stale."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        stats = self.engine.stats()
        total = stats["kv_blocks_total"]
        values = {
            "vllm:num_requests_running": ("Requests in the running batch.", stats["num_running"]),
            "vllm:num_requests_waiting": ("Requests waiting to be scheduled.", stats["num_waiting"]),
            "vllm:kv_cache_usage_perc": ("KV-cache block usage; 1 means every block is in use.",
                                         (total - stats["kv_blocks_free"]) / total if total else 0.0),
        }
        for name, (doc, value) in values.items():
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class _LoRARequestsCollector(Collector):
    """vLLM's `vllm:lora_requests_info`: the adapters of running and of waiting requests as labels
    (comma-separated names) of a gauge whose value is the scrape time. Gateway routers read it to
    send a request where its adapter is already resident."""

    def __init__(self, llm_engine):
        self.llm = llm_engine

    def collect(self):
        running, waiting = self.llm.lora_requests()
        family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests.",
                                   labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        family.add_metric([str(self.llm.lora.max_loras), ",".join(running), ",".join(waiting)], time.time())
        yield family


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.registry.register(_EngineStatsCollector(engine, model_name))
        self.lora_requests = Counter("loraserve:lora_requests", "Finished requests per adapter, by finish reason.",
                                     labels + ["lora_name", "finished_reason"], registry=r)
        self.lora_loads = Counter(
            "loraserve:lora_loads", "Adapter reads from disk: kind 'load' serves a new adapter (start-up or "
            "runtime), 'reload' re-reads one evicted from host memory; result 'success' or 'failure'.",
            labels + ["kind", "result"], registry=r)
        self.lora_load_time = Histogram("loraserve:lora_load_seconds", "Time to read and validate an adapter.",
                                        labels + ["kind"], buckets=_LOAD_BUCKETS, registry=r)
        lora = engine.engine.lora
        if lora is not None:
            self.registry.register(_LoRARequestsCollector(engine.engine))
            for report in lora.reports.values():     # loaded at start-up, before these metrics existed
                self.lora_loaded("load", report.load_seconds)
            lora.on_load = self.lora_loaded
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time between output tokens.",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               labels, buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Generated tokens per request.", labels,
            buckets=_TOKEN_BUCKETS, registry=r)

    def lora_loaded(self, kind: str, seconds: float | None) -> None:
        """One adapter read from disk (called on the engine thread); `seconds` is None if it failed."""
        m = self.model_name
        self.lora_loads.labels(m, kind, "failure" if seconds is None else "success").inc()
        if seconds is not None:
            self.lora_load_time.labels(m, kind).observe(seconds)

    def record_finished(self, num_prompt_tokens: int, num_output_tokens: int, finish_reason: str,
                        ttft_s: float | None, e2e_s: float, lora_name: str | None = None) -> None:
        """Record one engine request at its end (finished or aborted), so counters and histograms
        agree with each other."""
        m = self.model_name
        if lora_name is not None:
            self.lora_requests.labels(m, lora_name, finish_reason).inc()
        self.prompt_tokens.labels(m).inc(num_prompt_tokens)
        self.generation_tokens.labels(m).inc(num_output_tokens)
        self.request_success.labels(m, finish_reason).inc()
        self.request_prompt_tokens.labels(m).observe(num_prompt_tokens)
        self.request_generation_tokens.labels(m).observe(num_output_tokens)
        self.e2e.labels(m).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.labels(m).observe(ttft_s)
            if num_output_tokens > 1:
                self.tpot.labels(m).observe((e2e_s - ttft_s) / (num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
