"""Prometheus metrics of the gateway, from prometheus_client.

Counters and histograms are updated as things happen; gauges of live state (queue depth,
workers by state) and the broker's and supervisor's running counts are read at scrape time
by a collector, so they can never drift from the truth. Batch size and inference time come
from the workers' own reports, observed once per batch (RESULTs carry the batch id).

Each app gets its own registry, so several gateways in one process (tests) never collide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from protocol.version import package_version

if TYPE_CHECKING:
    from gateway.broker import Broker
    from gateway.connections import ConnectionGuard
    from gateway.tls import ServerTls

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: From 0.1 ms: the gateway's own overhead and a tiny model live down there.
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# *_created series double the scrape for no use here (Prometheus tracks resets itself).
disable_created_metrics()

#: metrics_code (protocol/errors.py) -> the reason label of batchwire_rejected_total.
REJECT_REASONS = {
    "overloaded": "overload",
    "held_memory_full": "memory",
    "deadline_exceeded": "deadline",
    "no_workers": "no_workers",
    "draining": "draining",
}


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("batchwire_requests", "HTTP requests answered, by route and "
                                "status (499: the client left before its answer)",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "batchwire_request_duration_seconds", "Time from request to answer, by route",
            ["route"], buckets=SECONDS_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "batchwire_queue_wait_seconds",
            "Time an item waited from admission until its batch started (worker-reported)",
            buckets=SECONDS_BUCKETS, registry=r)
        self.batch_size = Histogram("batchwire_batch_size", "Items per pipeline call",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "batchwire_batch_tokens",
            "Padded tokens per pipeline call: its longest input's tokens x its items",
            buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.padding_ratio = Histogram(
            "batchwire_padding_ratio", "Share of a pipeline call's padded tokens that was padding",
            buckets=RATIO_BUCKETS, registry=r)
        self.inference = Histogram("batchwire_inference_seconds",
                                   "Pipeline time per batch (worker-reported)",
                                   buckets=SECONDS_BUCKETS, registry=r)
        self.rejected = Counter("batchwire_rejected", "Requests refused, by reason", ["reason"],
                                registry=r)
        for reason in (*REJECT_REASONS.values(), "bad_input"):
            self.rejected.labels(reason)
        # The Prometheus convention for what is running: join on it to tell versions apart
        # in a rolling upgrade.
        Gauge("batchwire_build_info", "This gateway's batchwire version (always 1)",
              ["version"], registry=r).labels(package_version()).set(1)
        self._live: _LiveCollector | None = None
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def watch(self, broker: "Broker", restarts: Callable[[], int] = lambda: 0) -> None:
        """Read live state from this broker (and supervisor restart count) at scrape time."""
        self._live = _LiveCollector(broker, restarts)
        self.registry.register(self._live)

    def watch_connections(self, guard: "ConnectionGuard") -> None:
        """Read the listening socket's connection counts at scrape time."""
        if self._live is not None:
            self._live.connections = guard

    def watch_tls(self, tls: "ServerTls") -> None:
        """Read the served certificate's expiry at scrape time."""
        if self._live is not None:
            self._live.tls = tls

    def set_restarts(self, restarts: Callable[[], int]) -> None:
        if self._live is not None:
            self._live.restarts = restarts

    def observe_response(self, route: str, status: int, seconds: float, error_code: str | None) -> None:
        # The labelled children, looked up once per (route, status): labels() validates and
        # locks on every call. Routes are templates, statuses few, so the cache is small.
        children = self._children.get((route, status))
        if children is None:
            children = (self.requests.labels(route, str(status)),
                        self.request_duration.labels(route))
            self._children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        if error_code in REJECT_REASONS:
            self.rejected.labels(REJECT_REASONS[error_code]).inc()
        elif 400 <= status < 500 and error_code not in ("unauthorized", "cancelled"):
            self.rejected.labels("bad_input").inc()

    def observe_batch(self, batch_size: int, inference_ms: float, batch_tokens: int,
                      padding_ratio: float) -> None:
        self.batch_size.observe(batch_size)
        self.inference.observe(inference_ms / 1000.0)
        if batch_tokens:  # inputs without tokens (not text) have nothing to pad
            self.batch_tokens.observe(batch_tokens)
            self.padding_ratio.observe(padding_ratio)

    def observe_queue_wait(self, queue_ms: float) -> None:
        self.queue_wait.observe(queue_ms / 1000.0)

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    def __init__(self, broker: "Broker", restarts: Callable[[], int]):
        self.broker = broker
        self.restarts = restarts
        self.connections: "ConnectionGuard | None" = None
        self.tls: "ServerTls | None" = None

    def collect(self) -> Iterable:
        broker = self.broker
        yield GaugeMetricFamily("batchwire_queue_depth", "Requests waiting for a worker",
                                value=broker.queue_depth)
        yield GaugeMetricFamily("batchwire_held_bytes",
                                "Bytes held for requests: bodies until answered, answers until "
                                "written (bounded by --max-held-bytes)", value=broker.memory.held)
        workers = GaugeMetricFamily("batchwire_workers", "Connected workers by state",
                                    labels=["state"])
        busy = sum(1 for w in broker.workers.values() if w.in_flight)
        workers.add_metric(["ready"], len(broker.workers) - busy)
        workers.add_metric(["busy"], busy)
        yield workers
        yield CounterMetricFamily("batchwire_worker_restarts", "Local worker processes restarted",
                                  value=self.restarts())
        yield CounterMetricFamily("batchwire_requests_requeued",
                                  "Requests moved off a worker that died or left",
                                  value=broker.requeued)
        cancelled = CounterMetricFamily(
            "batchwire_requests_cancelled", "Requests withdrawn before their answer: the "
            "client went away, or another input of its list failed", labels=["reason"])
        for reason, count in broker.cancelled.items():
            cancelled.add_metric([reason], count)
        yield cancelled
        missed = CounterMetricFamily(
            "batchwire_deadline_missed", "Inputs answered 504 for their deadline, by where "
            "they were: waiting in the gateway's queue (add workers), refused by the worker as "
            "past or too close to it, or sent to a worker whose answer had not come",
            labels=["where"])
        for where, count in broker.deadline_missed.items():
            missed.add_metric([where], count)
        yield missed
        yield GaugeMetricFamily("batchwire_poison_inputs", "Inputs that killed the two workers "
                                "that ran them, refused at admission for --poison-memory-s",
                                value=broker.poison.remembered(broker.clock()))
        yield CounterMetricFamily("batchwire_poison_refused", "Requests refused for holding an "
                                  "input that killed two workers (500 worker_crashed, unrun)",
                                  value=broker.poison.refused)
        guard = self.connections
        if guard is not None:
            yield GaugeMetricFamily("batchwire_connections", "Client connections open now "
                                    "(bounded by --max-connections)", value=guard.open)
            closed = CounterMetricFamily(
                "batchwire_connections_closed",
                "Client connections the gateway closed itself, by reason: refused past "
                "--max-connections (with a 503), idle past --idle-timeout-s, or after a "
                "request that was not valid HTTP (with a 400 or 431)",
                labels=["reason"])
            closed.add_metric(["refused"], guard.refused)
            closed.add_metric(["idle"], guard.idle_closed)
            closed.add_metric(["malformed"], guard.malformed.count)
            yield closed
        tls = self.tls
        if tls is not None and tls.expires_at is not None:
            yield GaugeMetricFamily(
                "batchwire_tls_certificate_expiry_timestamp_seconds",
                "When the TLS certificate served now expires (Unix seconds): alert on it "
                "minus time() before a failed renewal reaches clients", value=tls.expires_at)
