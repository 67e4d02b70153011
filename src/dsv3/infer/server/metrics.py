"""/metrics in the Prometheus text format (prometheus_client), with vLLM's metrics under `dsv3_`.

Engine state is read when Prometheus scrapes (a collector over the engine's counters): waiting and
running requests, cache usage, prefix-cache queries and hits (tokens), prompt and generated tokens,
generated tokens per second over the last 10 s, preemptions, speculative drafts and accepted
drafts. Per-request latencies are histograms the server observes as each request finishes:
time to first token, time per output token after the first, end-to-end latency.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dsv3.infer.engine import RequestOutput
from dsv3.infer.server.async_engine import AsyncEngine

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class _EngineCollector:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self):
        async_engine, engine = self.engine, self.engine.engine
        stats = engine.stats

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(f"dsv3_{name}", doc)
            g.add_metric([], value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(f"dsv3_{name}", doc)
            c.add_metric([], value)
            return c

        yield gauge(
            "num_requests_waiting", "Requests waiting for a place in the batch.", async_engine.num_waiting
        )
        yield gauge("num_requests_running", "Sequences in the running batch.", engine.num_running)
        yield gauge(
            "kv_cache_usage_ratio", "Share of the paged latent cache's blocks in use.", engine.cache_usage
        )
        yield gauge("cache_blocks_total", "Blocks of the paged latent cache.", engine.blocks.num_blocks)
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            engine.blocks.prefix_queries,
        )
        yield counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache.", engine.blocks.prefix_hits
        )
        yield gauge(
            "prefix_cache_hit_rate",
            "Prefix-cache hits over queries since start (tokens).",
            engine.prefix_hit_rate or 0.0,
        )
        yield counter("prompt_tokens", "Prompt tokens of admitted requests.", stats.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield gauge(
            "generation_tokens_per_second",
            "Tokens generated per second over the last 10 s.",
            stats.tokens_per_second(),
        )
        yield counter(
            "num_preemptions", "Sequences preempted (recomputed later) for lack of cache.", stats.preemptions
        )
        yield counter("spec_decode_num_drafts", "Speculative drafts verified.", stats.spec_drafts)
        yield counter("spec_decode_num_accepted_tokens", "Speculative drafts accepted.", stats.spec_accepted)
        yield gauge(
            "spec_decode_acceptance_rate",
            "Accepted over verified drafts since start.",
            stats.acceptance_rate or 0.0,
        )


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram(
            "dsv3_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "dsv3_time_per_output_token_seconds",
            "Time per output token after the first, per request.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "dsv3_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "dsv3_request_success",
            "Requests finished, by finish reason.",
            ["finished_reason"],
            registry=self.registry,
        )

    def observe(self, out: RequestOutput) -> None:
        """Record a finished request's latencies."""
        end = out.finish_time or time.monotonic()
        if out.first_token_time is not None:
            self.ttft.observe(out.first_token_time - out.arrival_time)
            tokens = max(len(c.token_ids) for c in out.outputs)
            if tokens > 1:
                self.tpot.observe((end - out.first_token_time) / (tokens - 1))
        self.e2e.observe(end - out.arrival_time)
        for c in out.outputs:
            self.finished.labels(c.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
