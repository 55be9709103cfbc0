"""The gateway's Prometheus metrics, on a registry of its own (several gateways can live in one process).

Job counts per state and the queue depth are read from the job table at scrape time, so they are
right after a restart; latencies are histograms of the jobs finished by this process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.store import IN_QUEUE, JobStore

_SECONDS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)


class _TableCollector(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.counts()
        jobs = GaugeMetricFamily("lipsync_gateway_jobs", "Jobs in the job table by state", labels=["state"])
        for state, count in counts.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("lipsync_gateway_queue_depth", "Jobs waiting for a worker", value=counts[IN_QUEUE])


class Metrics:
    def __init__(self, store: JobStore) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_TableCollector(store))
        self.finished = Counter(
            "lipsync_gateway_jobs_finished", "Jobs finished by this process", ["status"], registry=self.registry
        )
        self.queue_wait = Histogram(
            "lipsync_gateway_queue_wait_seconds",
            "Submission to start of the last attempt",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "lipsync_gateway_job_seconds",
            "Submission to finish, per finished job",
            ["status"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "lipsync_gateway_inference_seconds",
            "Time on Triton of successful jobs",
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.requests = Counter(
            "lipsync_gateway_http_responses",
            "HTTP responses by route and status code",
            ["route", "code"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
