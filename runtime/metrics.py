"""Prometheus metrics for every role (prometheus-client), read from the cores at scrape time.

Shards and the coordinator already count everything in their plain-Python state; at
scrape time a collector asks its role for one consistent copy of those counters (the
role's ``gauges()``: ``runtime.gauges``) and turns it into
metric families, so the push path pays nothing for metrics and this module knows no
role's state or lock. Workers time their steps with histograms.

    shardps server ... --metrics-port 9101    ->  http://host:9101/metrics

| metric | role | labels |
|---|---|---|
| ``shardps_shard_version`` | server | shard, job |
| ``shardps_shard_pushes_total`` | server | shard, job, outcome = received, duplicate (a deduplicated retry), dropped, skipped (fp16 overflow), rejected |
| ``shardps_shard_bytes_total`` | server | shard, job, direction = in, out (over gRPC) |
| ``shardps_shard_shm_bytes_total`` | server | shard, job, direction = in, out (through shared memory) |
| ``shardps_shard_apply_seconds_total``, ``shardps_shard_wait_seconds_total`` | server | shard, job |
| ``shardps_shard_staleness`` (histogram) | server | shard, job |
| ``shardps_shard_rollbacks_total``, ``shardps_shard_steps_rolled_back_total`` | server | shard, job |
| ``shardps_shard_checkpoints_total``, ``shardps_shard_checkpoint_failures_total`` | server | shard, job |
| ``shardps_shard_membership_epoch`` | server | shard, job |
| ``shardps_faults_injected_total`` | every role | kind, method |
| ``shardps_membership_epoch``, ``shardps_workers``, ``shardps_lease_expiries_total``, ``shardps_rollbacks_total``, ``shardps_steps_rolled_back_total`` | coordinator | job (``shardps_workers``: and state) |
| ``shardps_worker_faults_total`` as reported by heartbeats | coordinator | job, worker, counter |
| ``shardps_worker_step_seconds`` (histogram), ``shardps_worker_samples_per_second``, ``shardps_worker_steps_total``, ``shardps_worker_retries_total``, ``shardps_worker_timeouts_total``, ``shardps_worker_rollbacks_total`` | worker | phase = compute, push_pull |

A push and its pull are one round trip in shardps (the reply carries the new
slice), so a worker's step splits into ``compute`` and ``push_pull``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .faults import FaultInjector
from .gauges import PUSH_OUTCOMES, JobGauges, ShardGauges

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32)


def serve(port: int, host: str, registry: CollectorRegistry) -> int:
    """Serve ``registry`` at http://host:port/metrics on a daemon thread; returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port


def _faults(injector: FaultInjector) -> CounterMetricFamily:
    family = CounterMetricFamily("shardps_faults_injected", "RPC faults this role injected", labels=["kind", "method"])
    for key, n in injector.counts().items():
        kind, _, method = key.partition("/")
        family.add_metric([kind, method], n)
    return family


class ShardCollector:
    """Metrics of one shard server (``gauges``: every job it holds, each read at one instant) and its fault injector."""

    def __init__(self, gauges: Callable[[], Iterable[ShardGauges]], injector: FaultInjector):
        self.gauges, self.injector = gauges, injector

    def collect(self):
        yield _faults(self.injector)
        labels = ["shard", "job"]
        fam = {
            "version": GaugeMetricFamily("shardps_shard_version", "Updates applied to the shard", labels=labels),
            "epoch": GaugeMetricFamily("shardps_shard_membership_epoch", "Newest membership epoch the shard knows",
                                       labels=labels),
            "pushes": CounterMetricFamily("shardps_shard_pushes", "Pushes by outcome", labels=[*labels, "outcome"]),
            "bytes": CounterMetricFamily("shardps_shard_bytes", "Payload bytes over gRPC", labels=[*labels, "direction"]),
            "shm_bytes": CounterMetricFamily("shardps_shard_shm_bytes", "Payload bytes through same-host shared memory",
                                             labels=[*labels, "direction"]),
            "apply": CounterMetricFamily("shardps_shard_apply_seconds", "Seconds in optimizer steps", labels=labels),
            "wait": CounterMetricFamily("shardps_shard_wait_seconds",
                                        "Seconds pushes waited at the sync barrier or SSP bound", labels=labels),
            "rollbacks": CounterMetricFamily("shardps_shard_rollbacks", "Rollbacks to a checkpoint", labels=labels),
            "rolled": CounterMetricFamily("shardps_shard_steps_rolled_back", "Updates undone by rollbacks",
                                          labels=labels),
            "checkpoints": CounterMetricFamily("shardps_shard_checkpoints", "Checkpoints written", labels=labels),
            "failures": CounterMetricFamily("shardps_shard_checkpoint_failures", "Checkpoints that failed to write",
                                            labels=labels),
            "staleness": HistogramMetricFamily("shardps_shard_staleness", "Staleness of applied pushes",
                                               labels=labels),
        }
        for g in self.gauges():
            key = [str(g.shard), g.job]
            fam["version"].add_metric(key, g.version)
            fam["epoch"].add_metric(key, g.epoch)
            fam["bytes"].add_metric([*key, "in"], g.bytes_in)
            fam["bytes"].add_metric([*key, "out"], g.bytes_out)
            fam["shm_bytes"].add_metric([*key, "in"], g.shm_bytes_in)
            fam["shm_bytes"].add_metric([*key, "out"], g.shm_bytes_out)
            for name, value in (("apply", g.apply_seconds), ("wait", g.wait_seconds), ("rollbacks", g.rollbacks),
                                ("rolled", g.steps_rolled_back), ("checkpoints", g.checkpoints),
                                ("failures", g.checkpoint_failures)):
                fam[name].add_metric(key, value)
            for outcome in PUSH_OUTCOMES:
                fam["pushes"].add_metric([*key, outcome], g.pushes.get(outcome, 0))
            buckets = [(str(b), sum(n for k, n in g.staleness.items() if k <= b)) for b in STALENESS_BUCKETS]
            buckets.append(("+Inf", sum(g.staleness.values())))
            fam["staleness"].add_metric(key, buckets, sum_value=sum(k * n for k, n in g.staleness.items()))
        yield from fam.values()


class CoordinatorCollector:
    """Metrics of the coordinator (``gauges``: every job, read at one instant) and its fault injector."""

    def __init__(self, gauges: Callable[[], Iterable[JobGauges]], injector: FaultInjector):
        self.gauges, self.injector = gauges, injector

    def collect(self):
        yield _faults(self.injector)
        epoch = GaugeMetricFamily("shardps_membership_epoch", "Current membership epoch", labels=["job"])
        workers = GaugeMetricFamily("shardps_workers", "Workers by state", labels=["job", "state"])
        expiries = CounterMetricFamily("shardps_lease_expiries", "Workers removed when their lease ran out",
                                       labels=["job"])
        rollbacks = CounterMetricFamily("shardps_rollbacks", "Job-wide rollbacks", labels=["job"])
        rolled = CounterMetricFamily("shardps_steps_rolled_back", "Steps undone by rollbacks", labels=["job"])
        faults = CounterMetricFamily("shardps_worker_faults", "Worker fault counters, from heartbeats",
                                     labels=["job", "worker", "counter"])
        for g in self.gauges():
            epoch.add_metric([g.job], g.epoch)
            workers.add_metric([g.job, "member"], g.members)
            workers.add_metric([g.job, "pending"], g.pending)
            expiries.add_metric([g.job], g.lease_expiries)
            rollbacks.add_metric([g.job], g.rollbacks)
            rolled.add_metric([g.job], g.steps_rolled_back)
            for worker, counters in g.worker_faults.items():
                for counter, n in counters.items():
                    faults.add_metric([g.job, str(worker), counter], n)
        yield from (epoch, workers, expiries, rollbacks, rolled, faults)


class WorkerMetrics:
    """A worker's step timings and counters, served while it trains."""

    def __init__(self, port: int, host: str = "0.0.0.0"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram("shardps_worker_step_seconds", "Step time by phase", ["phase"], registry=r,
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.samples_per_s = Gauge("shardps_worker_samples_per_second", "Samples per second, last step", registry=r)
        self.steps = Counter("shardps_worker_steps", "Steps completed", registry=r)
        self.retries = Counter("shardps_worker_retries", "Retried calls", registry=r)
        self.timeouts = Counter("shardps_worker_timeouts", "Calls that ran past their deadline", registry=r)
        self.rollbacks = Counter("shardps_worker_rollbacks", "Rollbacks this worker went through", registry=r)
        self._last = {"retries": 0, "timeouts": 0, "rollbacks": 0}
        self.port = serve(port, host, r)

    def step(self, samples: int, compute_s: float, push_pull_s: float, counters: dict[str, int]) -> None:
        self.step_seconds.labels("compute").observe(compute_s)
        self.step_seconds.labels("push_pull").observe(push_pull_s)
        self.samples_per_s.set(samples / max(1e-9, compute_s + push_pull_s))
        self.steps.inc()
        for name, metric in (("retries", self.retries), ("timeouts", self.timeouts), ("rollbacks", self.rollbacks)):
            delta = counters.get(name, 0) - self._last[name]
            if delta > 0:
                metric.inc(delta)
            self._last[name] = counters.get(name, 0)


def registry_with(collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
