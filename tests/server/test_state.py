"""The shard core, in-process: no sockets."""
import threading

import pytest
import torch

from shardps.proto.errors import FutureStep, InvalidArgument, StaleStep, UnknownWorker, WaitTimeout
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, StepOpts, UpdateMode
from shardps.proto.plan import ShardRange
from shardps.server.modes import Push
from shardps.server.state import ShardState

N = 100


def make_state(mode="sync", optimizer="sgd", timeout=10.0, **kwargs):
    kwargs.setdefault("lr", 0.1)
    job = JobConfig(Layout.from_shapes([("w", (N,), "float32")]), optimizer, kwargs, UpdateMode(mode), 2)
    state = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=timeout)
    state.initialize(torch.ones(N))
    return state


def push(worker, step, grad, batch=1, base=None, epoch=1, lr=None, job=None, **options):
    """A push; ``lr`` (with the state's ``job``) replaces every group's lr, else the shard keeps its own."""
    hyper = job.hyper_json(lr=lr) if lr is not None else ""
    return Push(worker, step, epoch, step if base is None else base, StepOpts(batch, hyper, **options), grad)


def in_thread(fn):
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("v", fn()))
    t.start()
    return t, result


def test_sync_mode_applies_one_update_after_all_workers_push():
    state = make_state("sync")
    members = frozenset({0, 1})
    t, result = in_thread(lambda: state.push(push(0, 0, torch.full((N,), 1.0), batch=1), members))
    t.join(0.3)
    assert t.is_alive() and state.version == 0  # worker 0 waits for worker 1
    assert torch.equal(state.param, torch.ones(N))
    out = state.push(push(1, 0, torch.full((N,), 4.0), batch=3), members)
    t.join(5)
    assert out.version == 1 == result["v"].version == state.version
    # sample-weighted mean: (1*1 + 3*4) / 4 = 3.25; SGD: 1 - 0.1 * 3.25
    assert torch.allclose(state.param, torch.full((N,), 1 - 0.325))


def test_async_mode_applies_each_push_immediately_and_records_staleness():
    state = make_state("async")
    members = frozenset({0, 1})
    a = state.push(push(0, 0, torch.ones(N), base=0), members)
    assert a.version == 1 and a.staleness == 0
    b = state.push(push(1, 0, torch.ones(N), base=0), members)  # computed on version 0, applied at 1
    assert b.version == 2 and b.staleness == 1
    assert torch.allclose(state.param, torch.full((N,), 0.8))
    assert state.stats.staleness == {0: 1, 1: 1}


def test_a_retried_push_is_applied_once_and_gets_the_same_version():
    for mode in ("sync", "async"):
        state = make_state(mode)
        members = frozenset({0})
        first = state.push(push(0, 0, torch.ones(N)), members)
        again = state.push(push(0, 0, torch.ones(N)), members)
        assert again.duplicate and again.version == first.version == state.version == 1
        assert state.stats.pushes_duplicate == 1


def test_sync_shard_update_equals_torch_optimizer_on_the_same_elements():
    torch.manual_seed(0)
    for name, kwargs in [("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
                         ("adam", dict(lr=0.01)), ("adamw", dict(lr=0.01, weight_decay=0.1))]:
        state = make_state("sync", name, **kwargs)
        ref = torch.nn.Parameter(torch.ones(N))
        ref_opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]([ref], **kwargs)
        for step in range(5):
            g = torch.randn(N)
            state.push(push(0, step, g, lr=kwargs["lr"], job=state.job), frozenset({0}))
            ref.grad = g
            ref_opt.step()
        assert torch.allclose(state.param, ref.detach(), atol=1e-6), name


@pytest.mark.parametrize("bad, error", [
    (dict(grad=torch.full((N,), float("nan"))), InvalidArgument),
    (dict(grad=torch.ones(N + 1)), InvalidArgument),
    (dict(batch=0), InvalidArgument),
    (dict(lr=float("inf")), InvalidArgument),
    (dict(lr=-0.1), InvalidArgument),
    (dict(lr=float("nan")), InvalidArgument),
    (dict(worker=9), UnknownWorker),
    (dict(step=5), FutureStep),
])
def test_bad_pushes_are_rejected_and_change_nothing(bad, error):
    state = make_state("sync")
    args = dict(worker=0, step=0, grad=torch.ones(N), batch=1, lr=0.1) | bad
    before = state.digest()
    with pytest.raises(error):
        state.push(push(args["worker"], args["step"], args["grad"], batch=args["batch"], lr=args["lr"], job=state.job),
                   frozenset({0, 1}))
    assert state.digest() == before
    assert state.stats.pushes_rejected == 1


def test_a_push_for_a_closed_step_is_stale():
    state = make_state("sync")
    state.push(push(0, 0, torch.ones(N)), frozenset({0}))
    state.push(push(0, 1, torch.ones(N)), frozenset({0}))
    with pytest.raises(StaleStep):
        state.push(push(1, 0, torch.ones(N)), frozenset({0, 1}))


def test_sync_wait_has_a_timeout_naming_the_missing_workers():
    state = make_state("sync", timeout=0.2)
    with pytest.raises(WaitTimeout, match=r"\[1\]"):
        state.push(push(0, 0, torch.ones(N)), frozenset({0, 1}))


def make_job_state(mode, members, timeout=10.0, **job):
    from shardps.proto.messages import JobConfig as J

    cfg = J(Layout.from_shapes([("w", (N,), "float32")]), "sgd", {"lr": 0.1}, UpdateMode(mode), members, **job)
    state = ShardState(ShardRange(0, 0, N), cfg, "job", step_timeout=timeout)
    state.initialize(torch.ones(N))
    return state


def test_backup_workers_close_a_step_without_the_slowest_and_drop_its_late_push():
    state = make_job_state("sync", 3, backup_workers=1)
    members = frozenset({0, 1, 2})
    t, result = in_thread(lambda: state.push(push(0, 0, torch.full((N,), 1.0)), members))
    t.join(0.2)
    assert t.is_alive()  # one of the two needed pushes so far
    out = state.push(push(1, 0, torch.full((N,), 3.0)), members)  # N - b = 2 pushes: the step closes
    t.join(5)
    assert out.version == 1 and result["v"].version == 1 and out.next_step == 1
    after_step = state.digest()
    assert torch.allclose(state.param, torch.full((N,), 1 - 0.1 * 2.0))  # mean of worker 0 and 1 only
    late = state.push(push(2, 0, torch.full((N,), 100.0)), members)  # worker 2 arrives after the close
    assert late.dropped and late.version == 1 and late.next_step == 1 and late.applied_lr == 0
    assert torch.allclose(state.param, torch.full((N,), 0.8))  # never applied
    assert state.stats.pushes_dropped == 1 and state.version == 1
    assert state.digest() != after_step  # only the dedup table moved: a retry of the late push is a duplicate
    again = state.push(push(2, 0, torch.full((N,), 100.0)), members)
    assert again.duplicate and torch.allclose(state.param, torch.full((N,), 0.8))
    # the late worker carries on at the open step, with everyone else
    t, result = in_thread(lambda: state.push(push(2, 1, torch.zeros(N)), members))
    state.push(push(0, 1, torch.zeros(N)), members)
    t.join(5)
    assert state.version == 2 and result["v"].version == 2 and not result["v"].dropped


def test_staleness_aware_lr_divides_the_lr_by_the_staleness():
    state = make_job_state("async", 1, staleness_lr=True)
    members = frozenset({0, 1, 2})
    g = torch.ones(N)
    applied = []
    for worker in range(3):  # all computed on version 0: staleness 0, 1, 2
        before = state.param.clone()
        out = state.push(push(worker, 0, g, base=0, lr=0.3, job=state.job), members)
        applied.append((out.staleness, out.applied_lr))
        assert torch.allclose(before - state.param, g * out.applied_lr)  # the step really used that lr
    assert applied == [(0, 0.3), (1, 0.3), (2, 0.15)]
    assert state.stats.staleness == {0: 1, 1: 1, 2: 1}


def test_backup_and_staleness_options_are_checked_against_the_mode():
    from shardps.proto.messages import JobConfig as J

    layout = Layout.from_shapes([("w", (N,), "float32")])
    with pytest.raises(ValueError, match="sync and ssp modes only"):
        J(layout, "sgd", {"lr": 0.1}, UpdateMode.ASYNC, 3, backup_workers=1)
    with pytest.raises(ValueError, match=r"min_workers-1 \(2\)"):
        J(layout, "sgd", {"lr": 0.1}, UpdateMode.SYNC, 3, backup_workers=3)
    with pytest.raises(ValueError, match="async and ssp modes only"):
        J(layout, "sgd", {"lr": 0.1}, UpdateMode.SYNC, 3, staleness_lr=True)


def test_ssp_lets_a_worker_run_k_steps_ahead_then_holds_it_until_the_gap_closes():
    state = make_job_state("ssp", 2, staleness_bound=2)
    members = frozenset({0, 1})
    a0 = state.push(push(0, 0, torch.ones(N), base=0), members)  # step 0 - 2 < 0: answered at once
    a1 = state.push(push(0, 1, torch.ones(N), base=0), members)  # computed on version 0: 1 step stale
    assert (a0.version, a1.version, a0.next_step, a1.next_step) == (0, 0, 1, 2)
    with pytest.raises(FutureStep, match="staleness bound 2"):
        state.push(push(0, 3, torch.ones(N), base=0), members)
    t, result = in_thread(lambda: state.push(push(0, 2, torch.ones(N), base=0), members))
    t.join(0.3)
    assert t.is_alive()  # step 2 needs step 0 closed: worker 1 is too far behind
    state.push(push(1, 0, torch.full((N,), 3.0), base=0), members)  # step 0 closes (and only step 0)
    t.join(5)
    assert result["v"].version == 1 and state.version == 1
    assert torch.allclose(state.param, torch.full((N,), 1 - 0.1 * 2.0))  # the mean of step 0's two pushes
    state.push(push(1, 1, torch.full((N,), 3.0), base=1), members)  # step 1 closes with both
    assert state.version == 2 and torch.allclose(state.param, torch.full((N,), 0.8 - 0.2))
    assert state.stats.staleness == {0: 3, 1: 1, 2: 1}  # step - base_version of every push


def test_ssp_with_bound_zero_is_sync():
    sync, ssp = make_job_state("sync", 2), make_job_state("ssp", 2, staleness_bound=0)
    members = frozenset({0, 1})
    for state in (sync, ssp):
        for step in range(3):
            t, _ = in_thread(lambda state=state, step=step: state.push(push(0, step, torch.full((N,), step + 1.0)),
                                                                       members))
            state.push(push(1, step, torch.full((N,), 2.0 * step), batch=3), members)
            t.join(5)
    assert torch.equal(sync.param, ssp.param) and sync.digest() == ssp.digest()


def test_ssp_staleness_aware_lr_divides_each_step_by_its_mean_staleness():
    job = JobConfig(Layout.from_shapes([("w", (N,), "float32")]), "sgd", {"lr": 0.1}, UpdateMode.SSP, 2,
                    staleness_lr=True, staleness_bound=2)
    state = ShardState(ShardRange(0, 0, N), job, "job", step_timeout=10)
    state.initialize(torch.ones(N))
    members, expected = frozenset({0, 1}), torch.ones(N)
    # worker 0 (batch 3) runs ahead on version 0; worker 1 (batch 1) keeps up.
    for step in range(2):
        early = state.push(push(0, step, torch.full((N,), 1.0), batch=3, base=0), members)
        assert early.applied_lr == 0.0  # answered before its step closed
    t, ahead = in_thread(lambda: state.push(push(0, 2, torch.full((N,), 1.0), batch=3, base=0), members))
    t.join(0.3)
    assert t.is_alive()  # 2 steps ahead of the last closed step (none): waits
    lrs = []
    for step, base in [(0, 0), (1, 1), (2, 1)]:
        out = state.push(push(1, step, torch.full((N,), 5.0), batch=1, base=base), members)
        s0, s1 = step - 0, step - base  # each push's staleness
        mean_staleness = (3 * s0 + 1 * s1) / 4
        lr = 0.1 / max(1.0, mean_staleness)
        expected -= lr * (3 * 1.0 + 1 * 5.0) / 4
        assert out.applied_lr == pytest.approx(lr)
        lrs.append(lr)
    t.join(5)
    # let go once step 0 closed; it knows its lr only if step 2 had closed by the time it woke
    answer = ahead["v"]
    assert answer.applied_lr == (pytest.approx(lrs[2]) if answer.version > 2 else 0.0)
    assert lrs[2] == pytest.approx(0.1 / 1.75)  # (3*2 + 1*1) / 4 = 1.75
    assert torch.allclose(state.param, expected)
    assert state.stats.staleness == {0: 3, 1: 2, 2: 1}  # worker 0: 0, 1, 2; worker 1: 0, 0, 1


def test_the_sync_mean_of_huge_finite_gradients_cannot_overflow():
    state = make_job_state("sync", 2)
    members = frozenset({0, 1})
    huge = torch.full((N,), 3e38)  # finite; the sum of two is not
    t, _ = in_thread(lambda: state.push(push(0, 0, huge.clone(), lr=1e-30, job=state.job), members))
    state.push(push(1, 0, huge.clone(), lr=1e-30, job=state.job), members)
    t.join(5)
    assert state.version == 1 and bool(torch.isfinite(state.param).all())
    assert torch.allclose(state.param, torch.full((N,), 1 - 1e-30 * 3e38))


def test_a_restore_at_the_version_a_reply_copy_was_cached_for_replies_with_the_restored_slice():
    # Async: link replies send a copy of the slice per version (ShardState.reply_tensor). A restore (or a
    # whole copy from a primary) can put other values in place at the same version number.
    state = make_state("async")
    state.push(push(0, 0, torch.ones(N)), frozenset({0, 1}))
    version, before = state.reply_tensor()
    snap = state.checkpoint_snapshot()
    snap.param = torch.full((N,), 7.0)
    state.restore(snap)
    again, after = state.reply_tensor()
    assert again == version == 1 and torch.equal(after, torch.full((N,), 7.0))
    assert torch.equal(state.snapshot(lambda p: [p.clone()])[1][0], after)  # the encoded reply agrees
