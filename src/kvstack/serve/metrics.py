"""Prometheus metrics of one server, named as vLLM names its own with a ``kvstack:`` prefix.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (several apps can live in one process, as
in the tests). Two sources feed it:

- the engine's state and cumulative counters (requests running and waiting, KV usage, prefix-cache queries
  and hits, preemptions, tier traffic, compression) come from the snapshot the engine thread publishes after
  each iteration (:meth:`EngineLoop.snapshot`), read by a custom collector at scrape time: the event loop never
  calls the engine while a step runs;
- per-request counters and latency histograms are recorded by the request handlers as each choice ends, so
  they count exactly what clients were sent (``generation_tokens_total`` is the sum of the ``completion_tokens``
  of the responses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ENGINE_COUNTERS", "ENGINE_GAUGES", "ServerMetrics"]

# Buckets sized for CPU serving: first tokens take tens of ms to many seconds, requests up to minutes.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

ENGINE_GAUGES: dict[str, tuple[str, str]] = {
    "num_running": ("kvstack:num_requests_running", "Sequences running in the engine (holding KV blocks)."),
    "num_waiting": ("kvstack:num_requests_waiting", "Sequences waiting for admission in the engine."),
    "kv_usage": ("kvstack:kv_cache_usage_perc", "Fraction of the KV pool's blocks in use (0 to 1)."),
    "num_blocks": ("kvstack:kv_cache_num_blocks", "Blocks in the KV pool."),
    "num_used": ("kvstack:kv_cache_used_blocks", "KV blocks held by requests."),
    "num_cached": ("kvstack:kv_cache_cached_blocks", "Unreferenced KV blocks kept for the prefix cache."),
    "num_free": ("kvstack:kv_cache_free_blocks", "Free KV blocks."),
    "in_flight": ("kvstack:num_requests_in_flight", "Requests accepted by the server and not over yet."),
    "threads": ("kvstack:engine_threads", "Intra-op CPU threads of the engine's forward."),
    "tier_host_bytes": ("kvstack:tier_host_bytes", "Bytes held by the host-memory tier."),
    "tier_disk_bytes": ("kvstack:tier_disk_bytes", "Bytes held by the disk tier."),
}
"""Engine snapshot key -> (gauge name, help)."""

ENGINE_COUNTERS: dict[str, tuple[str, str]] = {
    "prefix_cache_queries_tokens": ("kvstack:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits_tokens": ("kvstack:prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "prefix_cache_tier_hits_tokens": ("kvstack:prefix_cache_tier_hits",
                                      "Prompt tokens found in the host or disk tier and loaded back."),
    "preemptions": ("kvstack:num_preemptions", "Sequences preempted for lack of KV blocks."),
    "evictions": ("kvstack:kv_cache_evictions", "Cached KV blocks evicted from the pool."),
    "steps": ("kvstack:engine_steps", "Engine steps (scheduled batches)."),
    "failed_requests": ("kvstack:engine_failed_requests", "Sequences the engine failed (a step raised for them)."),
    "batched_tokens_total": ("kvstack:batched_tokens", "Tokens computed by the engine (prefill and decode)."),
    "tier_offloaded_blocks": ("kvstack:tier_offloaded_blocks", "KV blocks written from the pool to the tiers."),
    "tier_loaded_blocks": ("kvstack:tier_loaded_blocks", "KV blocks loaded from the tiers into the pool."),
    "compression_freed_blocks": ("kvstack:compression_freed_blocks", "KV blocks freed by per-request kv_policy."),
    "compression_evicted_tokens": ("kvstack:compression_evicted_tokens", "KV entries evicted by kv_policy."),
    "compression_compactions": ("kvstack:compression_compactions", "Compactions run by kv_policy."),
}
"""Engine cumulative counter key -> (counter name without ``_total``, help). Other ``tier_*`` counters of the
engine are exported as ``kvstack:tier_<name>_total``."""


class _EngineCollector(Collector):
    """Reads the engine thread's latest snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Mapping[str, float | int] | None], model_name: str) -> None:
        self._snapshot = snapshot
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        if snapshot is None:
            return
        labels = [self._model_name]
        for key, (name, documentation) in ENGINE_GAUGES.items():
            if key in snapshot:
                gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
                gauge.add_metric(labels, float(snapshot[key]))
                yield gauge
        for key, (name, documentation) in ENGINE_COUNTERS.items():
            if key in snapshot:
                counter = CounterMetricFamily(name, documentation, labels=["model_name"])
                counter.add_metric(labels, float(snapshot[key]))
                yield counter
        for key, value in snapshot.items():
            if key.startswith("tier_") and key not in ENGINE_GAUGES and key not in ENGINE_COUNTERS:
                counter = CounterMetricFamily(f"kvstack:{key}", f"Storage tier counter {key[5:]}.",
                                              labels=["model_name"])
                counter.add_metric(labels, float(value))
                yield counter


class ServerMetrics:
    """The registry of one app and the per-request metrics its handlers record.

    Parameters
    ----------
    snapshot : callable
        Returns the engine's latest metrics (see :meth:`EngineLoop.snapshot`), or None before the first.
    model_name : str
        Value of the ``model_name`` label.
    """

    def __init__(self, snapshot: Callable[[], Mapping[str, float | int] | None], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(snapshot, model_name))
        labels = ["model_name"]
        self.prompt_tokens = Counter("kvstack:prompt_tokens", "Prompt tokens of the requests accepted.",
                                     labels, registry=self.registry)
        self.generation_tokens = Counter("kvstack:generation_tokens", "Tokens generated and sent to clients.",
                                         labels, registry=self.registry)
        self.request_success = Counter(
            "kvstack:request_success", "Choices (samples) ended, by finish reason: stop, length, abort (the client "
            "went away) or error.", [*labels, "finished_reason"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "kvstack:time_to_first_token_seconds", "From a request's arrival to its choice's first token.",
            labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram(
            "kvstack:time_per_output_token_seconds", "Mean time between a choice's tokens after its first.",
            labels, buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            "kvstack:e2e_request_latency_seconds", "From a request's arrival to its choice's last token.",
            labels, buckets=E2E_BUCKETS, registry=self.registry)

    def record_prompt(self, num_tokens: int) -> None:
        """Count the prompt of one request the engine accepted."""
        self.prompt_tokens.labels(self.model_name).inc(num_tokens)

    def record_choice(self, finish_reason: str, num_tokens: int, ttft: float | None, tpot: float | None,
                      e2e: float | None) -> None:
        """Count one ended choice: its reason, its tokens and (when known) its latencies in seconds."""
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.generation_tokens.labels(self.model_name).inc(num_tokens)
        for histogram, value in ((self.time_to_first_token, ttft), (self.time_per_output_token, tpot),
                                 (self.e2e_request_latency, e2e)):
            if value is not None:
                histogram.labels(self.model_name).observe(value)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
