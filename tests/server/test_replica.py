"""Replicated shards, in-process: a primary's ShardState ships each step to real backup ShardStates
(``send`` calls them directly instead of over gRPC; the gRPC path is tested with real processes in
tests/faults/test_replication.py), and the coordinator's placement bookkeeping."""
import threading
import time

import pytest
import torch

from shardps.coordinator.placement import Placement
from shardps.proto.errors import InvalidArgument, NeedsCopy, NotPrimary, Superseded, Unavailable
from shardps.proto.gen import shardps_pb2 as pb
from shardps.proto.layout import Layout
from shardps.proto.messages import JobConfig, StepOpts, UpdateMode
from shardps.proto.plan import ShardRange
from shardps.server import replica as replicas
from shardps.server.modes import Push
from shardps.server.state import ShardState

N = 64


def job(optimizer="adam"):
    return JobConfig(Layout.from_shapes([("w", (N,), "float32")]), optimizer, {"lr": 0.01}, UpdateMode.SYNC, 2,
                     replicas=2)


def group(n_backups=1, lease=30.0):
    """A primary and its backups, wired together by a send that calls the backups' cores."""
    j = job()
    primary = ShardState(ShardRange(0, 0, N), j, "job", step_timeout=2.0)
    backups = {f"b{i}": ShardState(ShardRange(0, 0, N), j, "job", step_timeout=2.0) for i in range(n_backups)}
    sent = []

    def send(address, header, tensors):
        sent.append((address, header.full, header.version))
        target = backups[address]
        copies = {name: t.clone() for name, t in tensors}
        return target.take_copy(header, copies) if header.full else target.replay(header, copies)

    primary.send = send
    primary.replica.assign(1, True, list(backups), lease)
    for b in backups.values():
        b.replica.assign(1, False, [], lease)
    primary.initialize(torch.linspace(-1, 1, N))
    return primary, backups, sent


def step(state, t, grads):
    """Every worker in ``grads`` pushes step ``t``, each from its own thread (as the service does)."""
    members, outcomes = frozenset(grads), []
    threads = [threading.Thread(target=lambda w=w, g=g: outcomes.append(
        state.push(Push(w, t, 1, t, StepOpts(1, ""), g.clone()), members))) for w, g in grads.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    return outcomes


def test_every_step_reaches_the_backup_before_the_primary_applies_it_and_the_copies_stay_bit_identical():
    primary, backups, sent = group()
    gen = torch.Generator().manual_seed(0)
    for t in range(5):
        step(primary, t, {0: torch.randn(N, generator=gen), 1: torch.randn(N, generator=gen)})
    b = backups["b0"]
    assert primary.version == b.version == 5
    assert primary.digest() == b.digest()  # parameters, Adam moments, version and dedup table
    assert b.last_step == {0: 4, 1: 4}
    assert sent[0] == ("b0", True, 0)  # the starting point first, as a whole copy
    assert [v for _, full, v in sent[1:]] == [1, 2, 3, 4, 5] and not any(f for _, f, _ in sent[1:])


def test_a_new_backup_gets_a_whole_copy_of_the_applied_version_then_updates():
    primary, backups, sent = group()
    gen = torch.Generator().manual_seed(1)
    for t in range(3):
        step(primary, t, {0: torch.randn(N, generator=gen), 1: torch.randn(N, generator=gen)})
    late = ShardState(ShardRange(0, 0, N), primary.job, "job")
    late.replica.assign(2, False, [], 30)
    backups["late"] = late
    primary.replica.assign(2, True, ["b0", "late"], 30)
    backups["b0"].replica.assign(2, False, [], 30)
    for t in range(3, 6):
        step(primary, t, {0: torch.randn(N, generator=gen), 1: torch.randn(N, generator=gen)})
    assert primary.digest() == backups["b0"].digest() == late.digest()
    assert ("late", True, 3) in sent


def test_a_backup_refuses_updates_out_of_order_or_from_an_older_placement_and_changes_nothing():
    primary, backups, _ = group()
    b = backups["b0"]
    before = b.digest()
    grad = [("grad", torch.zeros(N))]
    skip_ahead = pb.ReplicaHeader(job_id="job", shard_id=0, placement_epoch=1, version=5, hyperparams_json="")
    with pytest.raises(NeedsCopy, match="needs a whole copy"):
        b.replay(skip_ahead, dict(grad))
    b.replica.assign(3, False, [], 30)
    stale = pb.ReplicaHeader(job_id="job", shard_id=0, placement_epoch=2, version=1, hyperparams_json="")
    with pytest.raises(Superseded, match="superseded by placement epoch 3") as refused:
        b.replay(stale, dict(grad))
    assert refused.value.placement_epoch == 3  # the sender steps down for it (a typed field, not the message)
    wrong_size = pb.ReplicaHeader(job_id="job", shard_id=0, placement_epoch=3, version=1, hyperparams_json="")
    with pytest.raises(InvalidArgument):
        b.replay(wrong_size, {"grad": torch.zeros(N + 1)})
    with pytest.raises(InvalidArgument):
        b.take_copy(pb.ReplicaHeader(job_id="job", shard_id=0, placement_epoch=3, full=True, version=9),
                    {"param": torch.zeros(N), "optim/0/exp_avg": torch.zeros(3)})
    assert b.digest() == before


def test_a_promoted_backup_answers_a_retried_push_its_primary_applied_as_a_duplicate():
    primary, backups, _ = group()
    gen = torch.Generator().manual_seed(2)
    grads = {0: torch.randn(N, generator=gen), 1: torch.randn(N, generator=gen)}
    step(primary, 0, grads)  # applied on both; say the replies were lost and the primary died
    b = backups["b0"]
    b.replica.assign(2, True, [], 30)  # promoted
    b.send = primary.send
    before = b.digest()
    outcomes = step(b, 0, grads)  # the workers' retries
    assert all(o.duplicate for o in outcomes) and b.version == 1 and b.digest() == before
    step(b, 1, grads)  # and the next step is applied once
    assert b.version == 2


def test_a_primary_whose_lease_ran_out_answers_nothing_and_forgets_pushes_it_did_not_apply():
    primary, backups, _ = group()
    gen = torch.Generator().manual_seed(3)
    step(primary, 0, {0: torch.randn(N, generator=gen), 1: torch.randn(N, generator=gen)})
    primary.replica.assign(1, True, ["b0"], 0.2)  # the last renewal, with a short lease
    time.sleep(0.3)  # no renewal since: the coordinator may have promoted the backup by now
    members = frozenset({0, 1})
    with pytest.raises(Unavailable, match="lease ran out"):
        primary.push(Push(0, 1, 1, 1, StepOpts(1, ""), torch.zeros(N)), members)
    assert primary.version == 1 and primary.last_step == {0: 0, 1: 0}
    primary.replica.assign(1, True, ["b0"], 30)  # renewed: it serves again
    step(primary, 1, {0: torch.zeros(N), 1: torch.zeros(N)})
    assert primary.version == backups["b0"].version == 2


def test_a_backup_that_cannot_be_reached_holds_the_step_until_the_coordinator_drops_it():
    primary, backups, _ = group()
    attempts, reported, applied_in = [], [], []

    def unreachable(address, header, tensors):
        attempts.append(address)
        reported.append(primary.replica.report())  # what SetReplicas would answer the coordinator now
        if len(attempts) == 3:  # the coordinator, told, drops the backup (placement epoch 2)
            primary.replica.assign(2, True, [], 30)
        raise Unavailable("connection refused")

    primary.send = unreachable
    primary.on_version = lambda s: applied_in.append(s.replica.placement_epoch)
    step(primary, 0, {0: torch.ones(N), 1: torch.ones(N)})
    assert applied_in == [2]  # applied only once the placement without the backup (epoch 2) arrived
    assert len(attempts) == 3 and reported[1:] == [["b0"], ["b0"]]  # it kept trying, and said so
    assert primary.version == 1 and backups["b0"].version == 0


def test_a_step_every_backup_took_is_applied_at_once_not_after_the_pause_between_retries(monkeypatch):
    # The pause is for backups that failed; were it taken after a round that reached every backup,
    # each step would wait for it (it did: 0.25 s per step at 10 MB, 15x the unreplicated step).
    monkeypatch.setattr(replicas, "RETRY_PAUSE_S", 60.0)
    primary, backups, _ = group(n_backups=2)
    for t in range(3):
        assert len(step(primary, t, {0: torch.ones(N), 1: torch.ones(N)})) == 2  # step joins each push for 10 s
    assert primary.version == backups["b0"].version == backups["b1"].version == 3


def test_placement_promotes_only_in_sync_backups_heals_and_hands_shards_back():
    p = Placement.initial(3, 2)
    assert p.replicas == {0: [0, 1], 1: [1, 2], 2: [2, 0]}
    p.in_sync = {0: {1}, 1: set(), 2: {0}}
    moved = p.lose(0)
    assert [(f.shard_id, f.to_server) for f in moved] == [(0, 1)]
    assert p.replicas[0] == [1] and p.replicas[2] == [2] and p.epoch == 2
    p.lose(1)  # shard 1 has no in-sync backup: it keeps its primary (it waits for it, or its checkpoint)
    assert p.replicas[1] == [1, 2]
    assert p.heal({0, 2}, 3, 2)
    assert p.replicas[0] == [1, 0] and p.replicas[2] == [2, 0]
    p.in_sync[0] = {0}
    assert p.heal({0, 1, 2}, 3, 2)  # server 0 is in sync with its own shard: it takes it back
    assert p.replicas[0][0] == 0 and p.failovers[-1].reason == "rebalance"
    assert Placement.from_dict(p.to_dict()).replicas == p.replicas


def test_async_pushes_each_reach_the_backup_and_the_copies_stay_identical():
    j = JobConfig(Layout.from_shapes([("w", (N,), "float32")]), "adam", {"lr": 0.01}, UpdateMode.ASYNC, 1,
                  replicas=2)
    primary, backup = ShardState(ShardRange(0, 0, N), j, "job"), ShardState(ShardRange(0, 0, N), j, "job")
    primary.send = lambda address, header, tensors: (backup.take_copy if header.full else backup.replay)(
        header, {name: t.clone() for name, t in tensors})
    primary.replica.assign(1, True, ["b"], 30)
    backup.replica.assign(1, False, [], 30)
    primary.initialize(torch.zeros(N))
    gen = torch.Generator().manual_seed(4)
    for t in range(3):
        for w in (0, 1):
            primary.push(Push(w, t, 1, t, StepOpts(1, ""), torch.randn(N, generator=gen)), frozenset({0, 1}))
    assert primary.version == backup.version == 6
    assert primary.digest() == backup.digest() and backup.last_step == {0: 2, 1: 2}


def test_in_sync_backups_stay_promotable_across_failovers_and_hand_backs():
    p = Placement.initial(3, 3)  # shard 0 on servers 0, 1, 2
    p.in_sync = {0: {1, 2}}
    p.lose(0)
    assert p.replicas[0] == [1, 2] and p.in_sync[0] == {2}  # server 2 acknowledged all server 0 answered
    assert not p.learn_in_sync(0, set())  # the new primary has not shipped to it yet: it stays promotable
    p.lose(1)
    assert p.replicas[0] == [2]  # ... and is promoted when the new primary is lost too
    assert p.heal({0, 1, 2}, 3, 3) and p.replicas[0] == [2, 0, 1]
    assert p.learn_in_sync(0, {0})
    assert p.heal({0, 1, 2}, 3, 3)  # server 0 is in sync with its own shard: handed back
    assert p.replicas[0][0] == 0 and p.in_sync[0] == {2}  # the old primary is a backup holding every version
    p.drop(0, 2)
    assert p.in_sync[0] == set() and p.replicas[0] == [0, 1]


def test_a_stale_primary_that_slept_steps_down_for_a_newer_placements_copy_instead_of_demoting_the_new_primary():
    # server-0 was paused while primary (placement 1); its backup was promoted (placement 2) and, when the
    # sleeper answers again, is told to copy to it. The sleeper must step down and take the copy; refusing
    # ("is the primary") made the legitimate primary demote itself.
    primary, backups, _ = group()
    sleeper = backups["b0"]
    sleeper.replica.assign(1, True, [], 30)  # what it last heard before it slept
    primary.replica.assign(2, True, ["b0"], 30)
    step(primary, 0, {0: torch.ones(N), 1: torch.ones(N)})
    assert primary.version == sleeper.version == 1 and primary.digest() == sleeper.digest()
    assert primary.replica.serving() == "" and sleeper.replica.serving() != ""


def test_a_push_voided_by_a_step_down_is_retried_not_rolled_back_even_if_the_replica_serves_again():
    primary, _, _ = group()
    outcome = []

    def push():
        try:
            primary.push(Push(0, 0, 1, 0, StepOpts(1, ""), torch.ones(N)), frozenset({0, 1}))
        except Exception as exc:  # noqa: BLE001 - the test looks at which
            outcome.append(exc)

    waiting = threading.Thread(target=push)
    waiting.start()
    for _ in range(1000):
        if primary.last_step.get(0) == 0:
            break
        time.sleep(0.01)
    with primary.cond:  # stepped down (its open step void), then placed primary again before the push looks
        primary.replica.assign(2, False, [], 30)
        replicas.void_open_steps(primary)
        primary.replica.assign(3, True, ["b0"], 30)
    waiting.join(10)
    assert len(outcome) == 1 and type(outcome[0]) is NotPrimary, outcome  # RolledBack would make it replay


def test_a_backup_its_primary_cannot_reach_is_placed_back_only_after_a_growing_backoff():
    # Placed back at once, a backup behind a cut link would cost its primary a copy attempt that hangs
    # until its deadline, every round; once reported in sync again, the next drop starts short again.
    p = Placement.initial(2, 2)  # shard 0 on [0, 1], shard 1 on [1, 0]
    assert p.drop(0, 1) and p.replicas[0] == [0]
    at = time.monotonic()
    assert not p.heal({0, 1}, 2, 2, now=at) and p.replicas[0] == [0]  # still within the first backoff
    assert p.heal({0, 1}, 2, 2, now=at + 1.5) and p.replicas[0] == [0, 1]
    assert p.drop(0, 1)  # unreachable again: the backoff doubles
    again = time.monotonic()
    assert not p.heal({0, 1}, 2, 2, now=again + 1.5)
    assert p.heal({0, 1}, 2, 2, now=again + 2.5) and p.replicas[0] == [0, 1]
    assert p.learn_in_sync(0, {1})  # reachable: forgiven
    assert p.drop(0, 1) and p.heal({0, 1}, 2, 2, now=time.monotonic() + 1.5)
    assert p.replicas[1] == [1, 0]  # the other shard's placement was never touched
