"""A Pull waiting for a future version (a joining worker waits for its join step) through a real
in-process gRPC shard server and the worker's client: a rollback or a newer membership view ends
the wait with an error the worker acts on, instead of leaving it to wait out its timeout."""
import threading
import time

import pytest
import torch

from shardps.proto import errors
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, MemberInfo, ShardInfo, StepOpts, UpdateMode, View
from shardps.proto.plan import ShardRange
from shardps.runtime.retry import RETRYABLE, Retrier
from shardps.runtime.server import bind, thread_pool_server
from shardps.server.modes import Push
from shardps.server.node import ShardNode
from shardps.server.service import ShardServicer, add_to_server
from shardps.server.state import ShardState
from shardps.worker.ps_client import ShardChannel

N = 64
WAIT_S = 20.0  # the server's longest wait for a version: what a pull would wait out without the fix


def view(epoch, start, *ids):
    return View(epoch, start, tuple(MemberInfo(w, r) for r, w in enumerate(ids)))


@pytest.fixture
def shard():
    """(state, client channel) of one sync shard at version 1 that knows view 1 (workers 0 and 1)."""
    job = JobConfig(Layout.from_shapes([("w", (N,), "float32")]), "sgd", {"lr": 0.1}, UpdateMode.SYNC, 1)
    state = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10)
    state.initialize(torch.ones(N))
    state.push(Push(0, 0, 1, 0, StepOpts(1, ""), torch.ones(N)), frozenset({0}))
    state.learn_view(view(1, 0, 0, 1), from_open_step=True)
    node = ShardNode(0, lambda job_id: (job_id, job, []), lambda job_id, epoch: view(epoch, 0, 0, 1))
    node.states[state.job_id] = state
    server = thread_pool_server(8)
    add_to_server(ShardServicer(node, 1 << 16, wait_timeout=WAIT_S, threads=8), server)
    port = bind(server, "127.0.0.1:0")
    server.start()
    # No retries: a pull that waited out the server's timeout raises WaitTimeout instead of trying again.
    channel = ShardChannel(ShardInfo(state.shard, f"127.0.0.1:{port}"), state.job_id, job.layout.fingerprint,
                           1 << 16, Retrier(budget=0), worker_id=1)
    yield state, channel
    channel.close()
    server.stop(0)


def pull_in_thread(channel, min_version, **kwargs):
    """Start a pull; returns (thread, result) where result["v"] is what it returned or raised."""
    result = {}

    def run():
        try:
            result["v"] = channel.pull(torch.empty(N), 60.0, min_version, **kwargs)
        except errors.ShardpsError as exc:
            result["v"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def until_waiting(state):
    """Until a call waits on the shard's condition (the pull is in its wait)."""
    deadline = time.monotonic() + 30
    while not state.cond._waiters:  # CPython's Condition keeps its waiters here
        assert time.monotonic() < deadline, "the pull never started waiting"
        time.sleep(0.01)


def test_a_pull_waiting_for_a_version_is_ended_by_a_rollback(shard):
    state, channel = shard
    with state.cond:
        snap = state.checkpoint_snapshot()  # version 1
    t, result = pull_in_thread(channel, 5)  # a joiner waits for the parameters of step 5
    until_waiting(state)
    state.restore(snap, epoch=2)  # the coordinator rolls the job back (a server restarted)
    t.join(2 * WAIT_S)
    err = result["v"]
    assert "rolled back to step 1 in epoch 2" in str(err) and "waited for version 5" in str(err)
    assert isinstance(err, errors.RolledBack) and (err.step, err.epoch) == (1, 2)


def test_a_pull_waiting_for_a_version_is_ended_by_a_newer_view(shard):
    state, channel = shard
    t, result = pull_in_thread(channel, 5)
    until_waiting(state)
    state.learn_view(view(2, 1, 1), from_open_step=True)  # worker 0's lease ran out: worker 1 from the open step
    t.join(2 * WAIT_S)
    err = result["v"]
    assert "membership changed (epoch 2) while this pull waited for version 5" in str(err)
    assert isinstance(err, errors.MembershipChanged) and err.epoch == 2
    assert err.code == "FAILED_PRECONDITION" and err.code not in RETRYABLE  # the worker acts on it: no blind retry


def test_a_pull_naming_its_epoch_is_told_at_once_about_changes_it_has_not_seen(shard):
    state, channel = shard
    with state.cond:
        snap = state.checkpoint_snapshot()
    state.learn_view(view(2, 4, 0, 1))  # installed on the shards before the coordinator publishes it
    with pytest.raises(errors.MembershipChanged, match=r"epoch 2\)"):
        channel.pull(torch.empty(N), 60.0, 5, epoch=1)
    state.restore(snap, epoch=3)  # before the pull arrives (the shard had restarted meanwhile)
    with pytest.raises(errors.RolledBack, match="rolled back to step 1 in epoch 3"):
        channel.pull(torch.empty(N), 60.0, 5, epoch=2)
    version, _ = channel.pull(torch.empty(N), 60.0, 1, epoch=3)  # the newest view, a version it has: served
    assert version == 1


def test_the_worker_tells_a_rollback_from_a_newer_view_by_reason_and_fields_not_by_their_words(shard, monkeypatch):
    monkeypatch.setattr(errors.ShardpsError, "__str__", lambda self: "reworded")  # server and worker alike
    state, channel = shard
    with state.cond:
        snap = state.checkpoint_snapshot()
    state.learn_view(view(2, 4, 0, 1))
    with pytest.raises(errors.MembershipChanged) as changed:
        channel.pull(torch.empty(N), 60.0, 5, epoch=1)
    assert changed.value.epoch == 2  # the views to fetch before pulling again
    state.restore(snap, epoch=3)
    with pytest.raises(errors.RolledBack) as rolled:
        channel.pull(torch.empty(N), 60.0, 5, epoch=2)
    assert (rolled.value.step, rolled.value.epoch) == (1, 3)  # where the worker carries on
