"""Prometheus metrics under vLLM's names, so dashboards and gateway routers built for vLLM read
loraserve unchanged. Each app gets its own registry: several servers (tests, or one process
serving twice) never collide on metric names."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


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


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.registry.register(_EngineStatsCollector(engine, model_name))
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

    def record_finished(self, num_prompt_tokens: int, num_output_tokens: int, finish_reason: str,
                        ttft_s: float | None, e2e_s: float) -> None:
        """Record one engine request at its end (finished or aborted), so counters and histograms
        agree with each other."""
        m = self.model_name
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
