"""Pushes in parts (server/parts.py), in-process: a sync step applied part by part as every member's
part arrives is the step applied whole; a retry continues a push whose parts stopped; a member that
leaves mid-step tears it and the step still closes; nobody reads the slice between two versions."""
import threading
import time

import pytest
import torch

from shardps.chaos import checker
from shardps.proto.errors import InvalidArgument, UnknownWorker
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, MemberInfo, StepOpts, UpdateMode, View
from shardps.proto.plan import ShardRange, part_stops
from shardps.runtime.history import History
from shardps.server import parts
from shardps.server.modes import Push
from shardps.server.state import ShardState

SHAPES = [("a", (37, 5)), ("b", (64,)), ("c", (129,)), ("d", (16, 16)), ("e", (300,))]
N = sum(torch.Size(s).numel() for _, s in SHAPES)
MEMBERS = frozenset({0, 1})


def make_state(optimizer="adam", mode="sync", history=None, **kwargs):
    kwargs.setdefault("lr", 0.01)
    layout = Layout.from_shapes([(n, s, "float32") for n, s in SHAPES])
    job = JobConfig(layout, optimizer, kwargs, UpdateMode(mode), 2,
                    **({"staleness_bound": 1} if mode == "ssp" else {}))
    state = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=20)
    if history is not None:
        state.history = history
    state.initialize(torch.linspace(-1, 1, N))
    return state


def stops_of(state: ShardState, k: int = 4) -> list[int]:
    return part_stops(state.optimizer.boundaries(), N, k, min_numel=1)


def grads(step: int, worker: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(1000 * step + worker))


class Attempt:
    """One attempt of a push in parts, driven by hand: ``send(k)`` lands part k and commits it."""

    def __init__(self, state, worker, step, stops, batch=1, grad=None):
        self.state, self.stops, self.grad = state, stops, grads(step, worker) if grad is None else grad
        self.buf = torch.empty(N)
        self.given = []
        self.push = Push(worker, step, 1, step, StepOpts(batch), self.buf, stops=stops)
        self.push.release = parts.releaser(self.push, lambda: self.given.append(True))
        self.aborted = False
        self.fill = parts.begin(state, self.push, MEMBERS, abort=self.abort, give=lambda: self.given.append(True))

    def abort(self):
        """What closing the attempt's link does: its handler's read fails and it lets go (on its thread)."""
        self.aborted = True

        def let_go():
            with self.state.cond:
                parts.stop(self.state, self.fill)
        threading.Thread(target=let_go).start()

    def send(self, k):
        lo, hi = (self.stops[k - 1] if k else 0), self.stops[k]
        if not self.fill.skips(k):
            self.fill.push.gradient[lo:hi].copy_(self.grad[lo:hi])
            with self.state.cond:
                parts.arrived(self.state, self.fill, k)

    def finish(self):
        with self.state.cond:
            parts.stop(self.state, self.fill)
            return parts.finish(self.state, self.fill)


def whole_steps(optimizer, steps, **kwargs):
    state = make_state(optimizer, **kwargs)
    for step in range(steps):
        t = threading.Thread(target=state.push, args=(Push(0, step, 1, step, StepOpts(3), grads(step, 0)), MEMBERS))
        t.start()
        state.push(Push(1, step, 1, step, StepOpts(5), grads(step, 1)), MEMBERS)
        t.join(10)
    return state


@pytest.mark.parametrize("optimizer,kwargs", [("adam", {}), ("sgd", {"momentum": 0.9, "nesterov": True}),
                                              ("adamw", {"weight_decay": 0.1}), ("rmsprop", {"centered": True})])
def test_a_step_applied_part_by_part_as_members_send_them_equals_the_step_applied_whole(optimizer, kwargs):
    reference = whole_steps(optimizer, 3, **kwargs)
    state = make_state(optimizer, **kwargs)
    stops = stops_of(state)
    assert len(stops) == 4
    for step in range(3):
        a, b = Attempt(state, 0, step, stops, batch=3), Attempt(state, 1, step, stops, batch=5)
        for k in range(len(stops)):  # interleaved: each part is applied once both sent it
            a.send(k)
            assert state.stats.parts_applied == step * 3 + k  # not before worker 1's part k
            b.send(k)
            if k < len(stops) - 1:
                assert state.version == step and state.policy.mid_step(state)
                assert state.policy.part_ready(state, step, k) and not state.policy.part_ready(state, step, k + 1)
        assert state.version == step + 1 and not state.policy.mid_step(state)
        assert a.finish().version == b.finish().version == step + 1
    assert torch.equal(state.param, reference.param)
    ours, theirs = state.optimizer.state_tensors(), reference.optimizer.state_tensors()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert state.stats.parts_applied == 3 * 3  # the last part of each step closes it


def test_a_reader_waits_while_a_step_is_applied_part_by_part_and_sees_one_version():
    state = make_state()
    stops = stops_of(state)
    a, b = Attempt(state, 0, 0, stops), Attempt(state, 1, 0, stops)
    for k in range(len(stops)):
        a.send(k)
    b.send(0)  # part 0 applied: the slice is between versions
    before = state.param.clone()
    t = threading.Thread(target=lambda: digests.append(state.digest()))
    digests: list[str] = []
    t.start()
    t.join(0.5)
    assert t.is_alive() and not digests  # the digest waits for the step to close
    for k in range(1, len(stops)):
        b.send(k)
    t.join(10)
    assert digests and state.version == 1 and not torch.equal(before, state.param)
    assert digests[0] == state.digest()  # taken at version 1, whole


def test_a_retry_continues_a_push_whose_parts_stopped_and_nothing_is_applied_twice():
    reference = whole_steps("adam", 1)
    state = make_state()
    stops = stops_of(state)
    a, b = Attempt(state, 0, 0, stops, batch=3), Attempt(state, 1, 0, stops, batch=5)
    for k in range(len(stops)):
        a.send(k)
    b.send(0)
    b.send(1)  # ... and worker 1's link breaks here
    retry = Attempt(state, 1, 0, stops, batch=5)
    assert b.aborted and not b.fill.active  # the first attempt was fenced off
    assert retry.fill.push is b.push and retry.fill.start == 2  # continues after the parts that came
    for k in range(len(stops)):
        retry.send(k)  # a retry sends every part; the ones already in are dropped
    assert retry.finish().version == 1 and a.finish().version == 1
    assert torch.equal(state.param, reference.param)
    assert state.stats.pushes_duplicate == 1 and state.version == 1
    again = Attempt(state, 1, 0, stops, batch=5)  # once the step closed, a repeat is a duplicate
    assert again.fill.duplicate and again.finish().duplicate
    assert a.given == [True] and b.given == [True]  # each taken buffer went back once, after its last writer


def test_a_member_that_leaves_mid_step_tears_it_and_the_step_closes_without_its_later_parts(tmp_path):
    history = History.open(str(tmp_path), "server")
    state = make_state(history=history)
    state.learn_view(View(1, 0, (MemberInfo(0, 0), MemberInfo(1, 1))))
    stops = stops_of(state)
    a, b = Attempt(state, 0, 0, stops), Attempt(state, 1, 0, stops)
    for k in range(len(stops)):
        a.send(k)
    b.send(0)  # then worker 1 dies
    state.learn_view(View(2, 0, (MemberInfo(0, 0),)), from_open_step=True)
    assert state.version == 1 and a.finish().version == 1  # closed with worker 0's parts alone
    with pytest.raises(UnknownWorker):
        with state.cond:
            parts.arrived(state, b.fill, 1)  # its later parts are refused
    with state.cond:
        parts.stop(state, b.fill)
    assert b.given == [True]  # its buffer went back once its attempt let go
    history.close()
    events = [e for e in checker.load(tmp_path)[0] if e["kind"] == "torn"]
    assert [(e["worker"], e["step"], e["parts"]) for e in events] == [(1, 0, 1)]
    verdict = checker.check_run(tmp_path)
    assert verdict.ok, verdict.violations  # closed with the members of its (new) view
    assert verdict.counts["torn"] == 1


def test_a_push_in_parts_is_refused_where_parts_cannot_be_applied_early_and_changes_nothing():
    for state, options in ((make_state(mode="ssp"), {}), (make_state(mode="async"), {}),
                           (make_state(), {"clip_max_norm": 1.0}), (make_state(), {"overflow": True})):
        before = state.param.clone()
        push = Push(0, 0, 1, 0, StepOpts(1, **options), torch.zeros(N), stops=stops_of(state))
        with pytest.raises(InvalidArgument, match="parts"):
            parts.begin(state, push, MEMBERS, abort=lambda: None, give=lambda: None)
        assert state.version == 0 and torch.equal(state.param, before) and state.policy.waiting_pushes() == 0


def test_a_continuing_attempt_that_cannot_fence_the_old_one_off_is_refused_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(parts, "FENCE_S", 0.2)
    state = make_state()
    stops = stops_of(state)
    b = Attempt(state, 1, 0, stops)
    b.abort = lambda: None  # an attempt stuck in a read that does not end when told
    b.fill.abort = b.abort
    b.send(0)
    start = time.monotonic()
    with pytest.raises(Exception, match="still holds its push"):
        Attempt(state, 1, 0, stops)
    assert time.monotonic() - start >= 0.2 and b.fill.active and b.push.have == 1
