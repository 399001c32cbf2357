"""The coordinator core, in-process."""
import pytest

from shardps.coordinator.state import Coordinator
from shardps.proto.errors import FailedPrecondition, Unavailable, WrongJob
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, UpdateMode


def job(shape=(10, 3), optimizer="sgd", lr=0.1, mode="sync", min_workers=2):
    layout = Layout.from_shapes([("w", shape, "float32"), ("b", (3,), "float32")])
    return JobConfig(layout, optimizer, {"lr": lr}, UpdateMode(mode), min_workers)


def ready(num_servers=2):
    c = Coordinator(num_servers)
    for i in range(num_servers):
        c.register_server(f"127.0.0.1:{7100 + i}")
    return c


def test_workers_wait_until_every_server_registered():
    c = Coordinator(2)
    c.register_server("127.0.0.1:7100")
    with pytest.raises(Unavailable, match="1/2"):
        c.register_worker(job())


def test_first_worker_defines_the_job_and_training_starts_at_min_workers():
    c = ready()
    a = c.register_worker(job(), "a")
    assert a.initializer and c.named("").latest().epoch == 0
    assert [(s.range.start, s.range.stop) for s in a.plan] == [(0, 0), (0, 33)]  # 33 elements: one aligned block
    b = c.register_worker(job(), "b")
    assert not b.initializer and b.job_id == a.job_id
    view = c.watch(a.job_id, 0, timeout=1)
    assert view.epoch == 1 and [(m.worker_id, m.rank) for m in view.members] == [(0, 0), (1, 1)]


@pytest.mark.parametrize("other, words", [
    (job(shape=(10, 4)), "fingerprint"),
    (job(optimizer="adam"), "optimizer"),
    (job(lr=0.2), "optimizer"),
    (job(mode="async"), "mode"),
])
def test_a_worker_with_a_different_spec_is_refused(other, words):
    c = ready()
    c.register_worker(job())
    with pytest.raises(WrongJob, match=words):
        c.register_worker(other)
    assert len(c.named("").pending) == 1  # nothing changed


class FakeShards:
    """Shard servers as the coordinator sees them: versions, and SetMembership's accept rule."""

    def __init__(self, versions, advance_on_refusal=0):
        self.version = dict(versions)  # address -> version
        self.installed = []  # (address, epoch, start, from_open_step, accepted)
        self.refuse_first = advance_on_refusal

    def checkpoints(self, address, job_id):
        from shardps.coordinator.shards import Checkpoints

        return Checkpoints([], self.version[address])

    def set_membership(self, address, job_id, view, from_open_step):
        if self.refuse_first and address.endswith("7100"):  # this shard raced ahead of the proposal
            self.refuse_first -= 1
            self.version[address] = view.start_step + 1
        accepted = from_open_step or self.version[address] <= view.start_step
        self.installed.append((address, view.epoch, view.start_step, from_open_step, accepted))
        return accepted, self.version[address]


def test_a_sync_joiner_waits_for_a_step_every_shard_accepts_and_async_joins_at_once():
    c = ready()
    c.shards = FakeShards({"127.0.0.1:7100": 7, "127.0.0.1:7101": 8}, advance_on_refusal=1)
    c.register_worker(job(min_workers=1))
    c.register_worker(job(min_workers=1))
    assert c.named("").latest().epoch == 1 and len(c.named("").pending) == 1  # not yet: at a step boundary
    [view] = c.reconfigure()
    # proposed 8 + 3 = 11; shard 0 was past it (12) and refused; proposed again further ahead
    assert [(a[-4:], e, s, ok) for a, e, s, _, ok in c.shards.installed[:2]] == [("7100", 2, 11, False),
                                                                                ("7101", 2, 11, True)]
    assert view.epoch == 2 and view.start_step > 12 and [m.rank for m in view.members] == [0, 1]
    assert c.named("").latest() == view and not c.named("").pending
    c = ready()
    reg = c.register_worker(job(mode="async", min_workers=1))
    c.register_worker(job(mode="async", min_workers=1))
    assert c.named("").latest().epoch == 2 and len(c.named("").latest().members) == 2
    c.leave(reg.job_id, reg.worker_id)
    assert c.named("").latest().epoch == 3 and [m.rank for m in c.named("").latest().members] == [0]


def test_an_expired_lease_removes_the_worker_from_the_open_step_unless_too_few_would_be_left():
    import time

    c = ready()
    c.shards = FakeShards({"127.0.0.1:7100": 5, "127.0.0.1:7101": 6})
    c.lease_s = 0.2
    a, b, d = (c.register_worker(job(min_workers=2)) for _ in range(3))
    assert c.named("").latest().epoch == 1 and len(c.named("").latest().members) == 2 and len(c.named("").pending) == 1
    time.sleep(0.3)
    c.heartbeat(a.job_id, a.worker_id, 5, {"retries": 2})
    c.heartbeat(a.job_id, d.worker_id, 0, {})
    [view] = c.reconfigure()  # b expired; d joins
    assert c.named("").expired == [b.worker_id]
    removal, join = c.named("").views[-2], c.named("").views[-1]
    assert removal.start_step == 5 and removal.worker_ids == {a.worker_id}  # from the lowest open step
    assert join is view and view.worker_ids == {a.worker_id, d.worker_id} and view.start_step >= 6 + 3
    with pytest.raises(Exception, match="lease ran out"):
        c.heartbeat(a.job_id, b.worker_id, 0, {})
    time.sleep(0.3)
    c.heartbeat(a.job_id, a.worker_id, 9, {})
    assert c.reconfigure() == []  # d expired too, but that would leave 1 < min_workers 2: wait, visibly
    assert "only 1 of min_workers 2" in c.named("").waiting_for and c.named("").latest() is view


def test_server_ids_are_assigned_and_reclaimed_by_restarted_servers():
    c = Coordinator(2)
    assert c.register_server("h:1") == 0
    assert c.register_server("h:2") == 1
    with pytest.raises(FailedPrecondition, match="shard-id"):
        c.register_server("h:3")
    assert c.register_server("h:9", shard_id=1) == 1 and c.servers[1] == "h:9"


def test_proportional_split_keeps_the_total_and_gives_everyone_a_row():
    from hypothesis import given, strategies as st

    from shardps.coordinator.splitter import proportional_split

    assert proportional_split(64, [3.0, 1.0]) == (48, 16)
    assert proportional_split(10, [1.0, 1.0, 1.0]) == (4, 3, 3)
    assert proportional_split(3, [1000.0, 1.0, 1.0]) == (1, 1, 1)

    @given(st.integers(1, 500), st.lists(st.floats(0.01, 1e4), min_size=1, max_size=8))
    def prop(extra, weights):
        total = len(weights) + extra - 1
        sizes = proportional_split(total, weights)
        assert sum(sizes) == total and min(sizes) >= 1
        exact = [(total - len(weights)) * w / sum(weights) for w in weights]
        assert all(abs(s - 1 - e) < 1 + 1e-9 for s, e in zip(sizes, exact))

    prop()


def test_balanced_windows_split_by_the_rates_of_two_windows_back_and_every_worker_sees_the_same_split():
    c = ready()
    spec = JobConfig(job().layout, "sgd", {"lr": 0.1}, UpdateMode.SYNC, 2, balance_every=5)
    a, b = c.register_worker(spec, "a"), c.register_worker(spec, "b")
    jid = a.job_id
    assert c.report_throughput(jid, a.worker_id, 0, 0.0, 40) == (20, 20)  # nothing measured yet
    assert c.report_throughput(jid, b.worker_id, 0, 0.0, 40) == (20, 20)
    assert c.report_throughput(jid, a.worker_id, 1, 300.0, 40) == (20, 20)  # window 0's rates decide window 2
    assert c.report_throughput(jid, b.worker_id, 1, 100.0, 40) == (20, 20)
    assert c.report_throughput(jid, b.worker_id, 2, 100.0, 40) == (30, 10)
    assert c.report_throughput(jid, a.worker_id, 2, 900.0, 40) == (30, 10)  # decided once, the same for all
    with pytest.raises(Exception, match="differs from the job's 40"):
        c.report_throughput(jid, a.worker_id, 3, 1.0, 48)
    with pytest.raises(Exception, match="not in the job's current view"):
        c.report_throughput(jid, 99, 3, 1.0, 40)
    plain = ready()
    w = plain.register_worker(job(min_workers=1), "w")
    with pytest.raises(FailedPrecondition, match="--balance-every"):
        plain.report_throughput(w.job_id, w.worker_id, 0, 0.0, 40)


def test_named_jobs_share_the_servers_with_their_own_ids_plans_and_views():
    c = ready()
    g = c.register_worker(JobConfig(job().layout, "adam", {"lr": 0.1}, UpdateMode.SYNC, 1, name="generator"))
    d_layout = Layout.from_shapes([("w", (100,), "float32")])
    d = c.register_worker(JobConfig(d_layout, "sgd", {"lr": 0.1}, UpdateMode.SYNC, 1, name="discriminator"))
    assert g.initializer and d.initializer and g.job_id != d.job_id and g.worker_id != d.worker_id
    assert [s.range.stop for s in d.plan] == [64, 100] and [s.range.stop for s in g.plan] == [0, 33]
    assert c.view(g.job_id, 0).worker_ids == {g.worker_id} and c.view(d.job_id, 0).worker_ids == {d.worker_id}
    with pytest.raises(WrongJob, match="not one of this cluster's jobs"):
        c.view("nope", 0)
    with pytest.raises(Exception, match="never registered"):
        c.heartbeat(g.job_id, d.worker_id, 0, {})  # a worker of one job is no member of the other


def test_a_restarted_coordinator_resumes_its_jobs_from_its_journal(tmp_path):
    from shardps.coordinator.journal import Journal, JournalError

    first = Coordinator(2, journal=Journal(tmp_path))
    for i in range(2):
        first.register_server(f"127.0.0.1:{7100 + i}")
    spec = JobConfig(job().layout, "sgd", {"lr": 0.1}, UpdateMode.SYNC, 2, balance_every=5)
    a, b = first.register_worker(spec, "a"), first.register_worker(spec, "b")
    split = first.report_throughput(a.job_id, a.worker_id, 0, 0.0, 40)
    with pytest.raises(JournalError, match="another coordinator is running"):
        Coordinator(2, journal=Journal(tmp_path))  # only one coordinator may act on a state directory
    first.journal.close()  # the process died
    again = Coordinator(2, journal=Journal(tmp_path))
    assert again.generation == first.generation + 1  # shards refuse orders from the old one
    state = again.job(a.job_id)
    assert state.job == spec and state.latest() == first.job(a.job_id).latest()
    assert again.servers == first.servers and [s.address for s in state.plan] == ["127.0.0.1:7100", "127.0.0.1:7101"]
    assert again.report_throughput(a.job_id, b.worker_id, 0, 0.0, 40) == split  # decided splits are kept
    assert again.heartbeat(a.job_id, b.worker_id, 3, {}) == (1, again.lease_s)  # members reattach as they were
    c = again.register_worker(spec, "c")
    assert c.worker_id == 2 and not c.initializer  # ids are never reused
    again.journal.close()
    with pytest.raises(JournalError, match="--num-servers 2"):
        Coordinator(3, journal=Journal(tmp_path))


def test_a_sync_worker_that_leaves_is_removed_from_the_open_step_and_the_last_one_standing_is_told():
    c = ready()
    c.shards = FakeShards({"127.0.0.1:7100": 4, "127.0.0.1:7101": 4})
    a, b, d = (c.register_worker(job(min_workers=2)) for _ in range(3))
    c.reconfigure()  # d joins
    assert len(c.named("").latest().members) == 3
    c.leave(a.job_id, a.worker_id)  # finished its loop
    [view] = c.reconfigure()
    assert view.worker_ids == {b.worker_id, d.worker_id} and view.start_step == 4  # from the open step
    c.leave(a.job_id, b.worker_id)
    assert c.reconfigure() == []  # 1 < min_workers 2: the view stays, and the job says why
    state = c.named("")
    assert state.abandoned and f"worker {b.worker_id} left" in state.waiting_for


def test_a_primary_silent_for_its_lease_is_replaced_and_one_heard_from_within_it_is_not():
    # The lease runs from the server's own clock in an answer the coordinator already had, so the
    # coordinator waits the lease (x 1.01) from that answer, no longer 1.25 x lease + 0.5 s.
    import dataclasses
    import time

    c = ready()
    reg = c.register_worker(dataclasses.replace(job(min_workers=1), replicas=2))
    c.replica_calls()  # placing starts
    lease = c.replica_lease_s
    in_sync = [(reg.job_id, 0, ["127.0.0.1:7101"], [])]  # server 0, shard 0's primary: server 1 holds its version
    now = time.monotonic()
    c.replicas_renewed({0: (now - 0.5 * lease, in_sync), 1: (now, [])})  # within its lease (in sync learned)
    assert c.replicas_renewed({0: None, 1: (time.monotonic(), [])}) is False  # its last answer: half a lease ago
    assert c.named("").placement.primary(0) == 0 and not c.down
    c.last_ok[0] = time.monotonic() - 1.05 * lease  # now silent for longer than the lease it holds
    assert c.replicas_renewed({0: None, 1: (time.monotonic(), [])})
    placement = c.named("").placement
    assert placement.primary(0) == 1 and [(f.shard_id, f.reason) for f in placement.failovers] == [(0, "dead")]
    assert 0 in c.down
