"""Serving metrics beside Ray Serve's own (request counts, latencies, replica counts).

Exported through Ray's metrics agent (`ray.serve.metrics`), so the same Prometheus scrape of the
Ray pods that sees `ray_serve_*` sees these `ray_meddistill_*` series:
  meddistill_time_to_first_token_seconds   histogram, per endpoint kind
  meddistill_request_seconds               histogram, whole request
  meddistill_generated_tokens_total        counter
  meddistill_rejected_requests_total       counter (429: engine queue full)
  meddistill_queue_length / _running       gauges: requests waiting for / holding a batch row
  meddistill_tokens_per_second             gauge: decode throughput over the last 2 s
"""
from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

_LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]


class ServeMetrics:
    def __init__(self, model_name: str):
        tags = ("model", "kind")
        self.model = model_name
        self.ttft = Histogram("meddistill_time_to_first_token_seconds", "Time to first token.",
                              boundaries=_LATENCY_BUCKETS, tag_keys=tags)
        self.latency = Histogram("meddistill_request_seconds", "Whole request latency.",
                                 boundaries=_LATENCY_BUCKETS, tag_keys=tags)
        self.tokens = Counter("meddistill_generated_tokens_total", "Generated tokens.", tag_keys=tags)
        self.rejects = Counter("meddistill_rejected_requests_total", "Requests refused with 429.", tag_keys=tags)
        self.queue = Gauge("meddistill_queue_length", "Requests waiting for a batch row.", tag_keys=("model",))
        self.running = Gauge("meddistill_running", "Requests in the running batch.", tag_keys=("model",))
        self.tps = Gauge("meddistill_tokens_per_second", "Decode throughput of this replica.", tag_keys=("model",))

    def _tags(self, kind: str) -> dict:
        return {"model": self.model, "kind": kind}

    def first_token(self, kind: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags=self._tags(kind))

    def finished(self, kind: str, completion_tokens: int, seconds: float) -> None:
        self.latency.observe(seconds, tags=self._tags(kind))
        self.tokens.inc(completion_tokens, tags=self._tags(kind))

    def rejected(self, kind: str) -> None:
        self.rejects.inc(1, tags=self._tags(kind))

    def engine_state(self, queue_length: int, running: int, tokens_per_second: float) -> None:
        tags = {"model": self.model}
        self.queue.set(queue_length, tags=tags)
        self.running.set(running, tags=tags)
        self.tps.set(tokens_per_second, tags=tags)
