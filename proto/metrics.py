"""Prometheus metrics for every role (prometheus-client), read from the cores at scrape time.

Shards and the coordinator already count everything in their plain-Python state;
a collector turns those counters into metric families when Prometheus scrapes, so
the push path pays nothing for metrics. Workers time their steps with histograms.

    shardps server ... --metrics-port 9101    ->  http://host:9101/metrics

| metric | role | labels |
|---|---|---|
| ``shardps_shard_version`` | server | shard |
| ``shardps_shard_pushes_total`` | server | shard, outcome = received, duplicate (a deduplicated retry), dropped, rejected |
| ``shardps_shard_bytes_total`` | server | shard, direction = in, out |
| ``shardps_shard_apply_seconds_total``, ``shardps_shard_wait_seconds_total`` | server | shard |
| ``shardps_shard_staleness`` (histogram) | server | shard |
| ``shardps_shard_rollbacks_total``, ``shardps_shard_steps_rolled_back_total`` | server | shard |
| ``shardps_shard_checkpoints_total``, ``shardps_shard_checkpoint_failures_total`` | server | shard |
| ``shardps_shard_membership_epoch`` | server | shard |
| ``shardps_faults_injected_total`` | every role | kind, method |
| ``shardps_membership_epoch``, ``shardps_workers``, ``shardps_lease_expiries_total``, ``shardps_rollbacks_total`` | coordinator | |
| ``shardps_worker_retries_total`` and friends as reported by heartbeats | coordinator | worker, counter |
| ``shardps_worker_step_seconds`` (histogram), ``shardps_worker_samples_per_second``, ``shardps_worker_steps_total``, ``shardps_worker_retries_total``, ``shardps_worker_timeouts_total``, ``shardps_worker_rollbacks_total`` | worker | phase = compute, push_pull |

A push and its pull are one round trip in shardps (the reply carries the new
slice), so a worker's step splits into ``compute`` and ``push_pull``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32)


def serve(port: int, host: str, registry: CollectorRegistry) -> int:
    """Serve ``registry`` at http://host:port/metrics on a daemon thread; returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port


def _faults(injector) -> CounterMetricFamily:
    family = CounterMetricFamily("shardps_faults_injected", "RPC faults this role injected", labels=["kind", "method"])
    for key, n in dict(injector.injected).items():
        kind, _, method = key.partition("/")
        family.add_metric([kind, method], n)
    return family


class ShardCollector:
    """Metrics of one shard server (its ``ShardNode``) and its fault injector."""

    def __init__(self, node, injector):
        self.node, self.injector = node, injector

    def collect(self):
        yield _faults(self.injector)
        state = self.node.state
        if state is None:
            return
        shard = [str(self.node.shard_id)]
        with state.cond:  # one consistent copy
            s = state.stats
            version, epoch, staleness = state.version, state.latest_epoch, dict(s.staleness)
            pushes = {"received": s.pushes_received, "duplicate": s.pushes_duplicate, "dropped": s.pushes_dropped,
                      "rejected": s.pushes_rejected}
            values = (s.bytes_in, s.bytes_out, s.apply_seconds, s.wait_seconds, s.rollbacks, s.steps_rolled_back)
        bytes_in, bytes_out, apply_s, wait_s, rollbacks, rolled = values
        checkpointer = self.node.checkpointer

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["shard"])
            g.add_metric(shard, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["shard"])
            c.add_metric(shard, value)
            return c

        yield gauge("shardps_shard_version", "Updates applied to the shard", version)
        yield gauge("shardps_shard_membership_epoch", "Newest membership epoch the shard knows", epoch)
        p = CounterMetricFamily("shardps_shard_pushes", "Pushes by outcome", labels=["shard", "outcome"])
        for outcome, n in pushes.items():
            p.add_metric([*shard, outcome], n)
        yield p
        b = CounterMetricFamily("shardps_shard_bytes", "Payload bytes", labels=["shard", "direction"])
        b.add_metric([*shard, "in"], bytes_in)
        b.add_metric([*shard, "out"], bytes_out)
        yield b
        yield counter("shardps_shard_apply_seconds", "Seconds in optimizer steps", apply_s)
        yield counter("shardps_shard_wait_seconds", "Seconds pushes waited at the sync barrier or SSP bound", wait_s)
        yield counter("shardps_shard_rollbacks", "Rollbacks to a checkpoint", rollbacks)
        yield counter("shardps_shard_steps_rolled_back", "Updates undone by rollbacks", rolled)
        yield counter("shardps_shard_checkpoints", "Checkpoints written", checkpointer.written if checkpointer else 0)
        yield counter("shardps_shard_checkpoint_failures", "Checkpoints that failed to write",
                      checkpointer.failures if checkpointer else 0)
        h = HistogramMetricFamily("shardps_shard_staleness", "Staleness of applied pushes", labels=["shard"])
        buckets, running = [], 0
        for bound in STALENESS_BUCKETS:
            running = sum(n for k, n in staleness.items() if k <= bound)
            buckets.append((str(bound), running))
        buckets.append(("+Inf", sum(staleness.values())))
        h.add_metric(shard, buckets, sum_value=sum(k * n for k, n in staleness.items()))
        yield h


class CoordinatorCollector:
    def __init__(self, coordinator, injector):
        self.c, self.injector = coordinator, injector

    def collect(self):
        yield _faults(self.injector)
        c = self.c
        with c.cond:
            view, expired, rollbacks = c.latest(), len(c.expired), list(c.rollbacks)
            reports = {w: dict(counters) for w, (_, counters) in c.reports.items()}
            pending = len(c.pending)
        yield GaugeMetricFamily("shardps_membership_epoch", "Current membership epoch", value=view.epoch)
        w = GaugeMetricFamily("shardps_workers", "Workers by state", labels=["state"])
        w.add_metric(["member"], len(view.members))
        w.add_metric(["pending"], pending)
        yield w
        yield CounterMetricFamily("shardps_lease_expiries", "Workers removed when their lease ran out", value=expired)
        yield CounterMetricFamily("shardps_rollbacks", "Job-wide rollbacks", value=len(rollbacks))
        yield CounterMetricFamily("shardps_steps_rolled_back", "Steps undone by rollbacks",
                                  value=sum(r.steps for r in rollbacks))
        f = CounterMetricFamily("shardps_worker_faults", "Worker fault counters, from heartbeats",
                                labels=["worker", "counter"])
        for worker, counters in reports.items():
            for name, n in counters.items():
                f.add_metric([str(worker), name], n)
        yield f


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
