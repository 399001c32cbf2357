"""A shard's hold on same-host workers' segments (ShardState.segment / read_grads / write_params),
driven in-process with real segments in /dev/shm: what a worker does to its file reaches no
state but that of its own push."""
import os
import threading

import pytest
import torch

from shardps.proto.errors import FailedPrecondition, UnknownWorker
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, MemberInfo, StepOpts, UpdateMode, View
from shardps.proto.plan import ShardRange
from shardps.runtime.shm import Segment, ShmUnavailable
from shardps.server.modes import Push
from shardps.server.state import ShardState

N = 100


def in_thread(fn):
    t = threading.Thread(target=fn)
    t.start()
    return t


@pytest.fixture
def state():
    job = JobConfig(Layout.from_shapes([("w", (N,), "float32")]), "sgd", {"lr": 0.1}, UpdateMode.SYNC, 2)
    s = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10.0)
    s.initialize(torch.ones(N))
    s.learn_view(View(1, 0, (MemberInfo(0, 0), MemberInfo(1, 1))))
    return s


@pytest.fixture
def segments():
    made = []

    def make(fill=1.0):
        try:
            seg = Segment.create(N)
        except ShmUnavailable:
            pytest.skip("no /dev/shm here")
        seg.grads.fill_(fill)
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.unlink()


def received(state, worker, seg):
    """What the Push handler does with a segment: the gradient copied into a buffer of the server's."""
    held = state.segments.open(worker, seg.name, seg.nonce)
    try:
        buf = torch.empty(N)
        state.segments.read(worker, held, buf)
        return held, buf
    finally:
        held.release()


def test_a_gradient_is_copied_on_arrival_so_a_worker_rewriting_its_memory_changes_nothing(state, segments):
    mine, theirs = segments(1.0), segments(3.0)
    _, grad0 = received(state, 0, mine)
    t = in_thread(lambda: state.push(Push(0, 0, 1, 0, StepOpts(1), grad0), frozenset({0, 1})))
    t.join(0.3)
    mine.grads.fill_(float("nan"))  # the worker writes into its gradient while its step is open
    _, grad1 = received(state, 1, theirs)
    state.push(Push(1, 0, 1, 0, StepOpts(1), grad1), frozenset({0, 1}))
    t.join(5)
    assert state.version == 1 and torch.allclose(state.param, torch.full((N,), 1 - 0.1 * 2.0))
    held = state.segments.open(0, mine.name, mine.nonce)
    try:
        assert state.write_params(held) == 1
    finally:
        held.release()
    assert torch.equal(mine.values, state.param)  # the reply landed in the worker's values


def test_a_segment_is_opened_for_members_only_and_stays_bound_to_the_worker_holding_it(state, segments):
    mine, theirs, stranger = segments(), segments(), segments()
    with pytest.raises(UnknownWorker, match="not a member"):
        state.segments.open(7, stranger.name, stranger.nonce)
    received(state, 0, mine)
    received(state, 1, theirs)
    with pytest.raises(FailedPrecondition, match="no shared memory: segment .* is worker 1's"):
        state.segments.open(0, theirs.name, theirs.nonce)  # worker 0 naming worker 1's segment
    assert state.segments[0].name == mine.name and state.segments[1].name == theirs.name  # nothing changed
    old = state.segments[0]
    moved = segments()
    received(state, 0, moved)  # a worker moves to a new segment of its own (FlatParams.renew_segment)
    assert state.segments[0].name == moved.name and not old.acquire()  # the old descriptor is closed


def test_a_segment_in_use_stays_open_until_its_last_use_ends(state, segments):
    mine = segments(2.0)
    held = state.segments.open(0, mine.name, mine.nonce)  # a push in flight
    state.learn_view(View(2, 0, (MemberInfo(1, 0),)))  # worker 0 left: its segment is let go and unlinked
    assert 0 not in state.segments and not os.path.exists(mine.path)
    buf = torch.empty(N)
    state.segments.read(0, held, buf)  # the call in flight still reads through its own descriptor
    assert torch.equal(buf, torch.full((N,), 2.0))
    held.release()
    assert not held.acquire()


def test_a_truncated_segment_fails_only_that_push_and_changes_nothing(state, segments):
    mine = segments()
    received(state, 0, mine)
    os.truncate(mine.path, 4096)  # the worker shrinks its file under the server
    before = state.param.clone()
    held = state.segments.open(0, mine.name, mine.nonce)
    try:
        with pytest.raises(FailedPrecondition, match="no shared memory: .*truncated"):
            state.segments.read(0, held, torch.empty(N))
    finally:
        held.release()
    assert 0 not in state.segments  # let go: the worker goes on over gRPC (or a new segment)
    assert state.version == 0 and torch.equal(state.param, before) and not state.last_step
