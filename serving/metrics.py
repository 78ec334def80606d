"""The API's Prometheus metrics, in a registry of its own per app (prometheus-client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from serving.batcher import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5,
                   5.0, 10.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("finsent_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("finsent_request_seconds", "time from request to response", ["route", "status"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("finsent_queue_texts", "texts waiting for a batch", registry=r)
        self.batch_texts = Histogram("finsent_batch_texts", "texts per inference batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_tokens = Histogram("finsent_batch_padded_tokens", "padded tokens per inference batch",
                                      buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768), registry=r)
        self.queue_seconds = Histogram("finsent_queue_seconds", "time a request's texts waited for their batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("finsent_inference_seconds", "ONNX Runtime time per batch",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("finsent_rejected", "requests turned away before inference", ["reason"], registry=r)
        self.predictions = Counter("finsent_predicted_texts", "texts scored, by the model that answered",
                                   ["model_version", "role"], registry=r)
        self.model = Info("finsent_model", "the model being served", registry=r)
        self.load_failures = Counter("finsent_model_load_failures", "model loads or reloads that failed", registry=r)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_texts.observe(stats.texts)
        self.batch_tokens.observe(stats.padded_tokens)
        self.inference_seconds.observe(stats.inference_seconds)
        for waited in stats.queue_seconds:
            self.queue_seconds.observe(waited)
