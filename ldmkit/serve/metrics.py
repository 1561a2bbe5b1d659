"""Prometheus metrics of one server: requests by route and status, latency, queue depth, batch sizes, images."""

from __future__ import annotations


class Metrics:
    """A registry of its own (two servers in one process, as in tests, do not share counters)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ldmkit_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ldmkit_request_seconds",
            "Time from request to response",
            ["route"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.queue = Gauge("ldmkit_queue_images", "Images waiting in the queue", registry=self.registry)
        self.batch = Histogram(
            "ldmkit_batch_images",
            "Images per batch run together",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.policy = Counter(
            "ldmkit_policy_refusals", "Prompts refused by the content policy, by rule", ["rule"], registry=self.registry
        )
        self.safety = Counter(
            "ldmkit_safety_flagged",
            "Images the safety filter withheld or blurred",
            ["model", "action"],
            registry=self.registry,
        )
        self.similarity = Counter(
            "ldmkit_similarity_flagged",
            "Images at or above the similarity threshold to a training image, by model and the policy's action",
            ["model", "action"],
            registry=self.registry,
        )
        self.drift = Gauge(
            "ldmkit_output_frechet_distance",
            "Frechet distance between the Inception features of a model's last outputs and its reference statistics",
            ["model"],
            registry=self.registry,
        )
        self.images = Counter("ldmkit_images", "Images generated, by model", ["model"], registry=self.registry)
        self.audit_failures = Counter(
            "ldmkit_audit_write_failures",
            "Answers withheld (500) because their audit row could not be written",
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "ldmkit_protocol_errors",
            "Connections refused before a request reached the API (malformed HTTP: 400; headers too slow: 408), "
            "which have no audit row",
            ["status"],
            registry=self.registry,
        )

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
