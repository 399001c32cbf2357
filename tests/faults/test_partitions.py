"""Network partitions of a replicated job (replicas=2), each host in its own network namespace (root):
one link cut mid-run, then mended. Whatever the cut, the recorded history must prove every push applied
once under one primary at a time, the job must finish where one process on the union batch ends, and
the copies of every shard must end equal."""
import json
import sys
import time
from pathlib import Path

import pytest

from shardps import LocalCluster
from shardps.chaos.checker import check_run
from shardps.chaos.netns import available
from shardps.client.sdk import shard_status
from shardps.coordinator.client import CoordinatorClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from task import reference  # noqa: E402
from waiting import wait_until  # noqa: E402

STEPS, CUT_AT = 40, 10
SIZES, KWARGS = [24, 40], {"lr": 0.01}


def plan(coord):
    return {s.range.shard_id: s for s in coord.job()[2]}


def version(coord, shard):
    """The version of ``shard`` on its primary now (-1 while the job is not defined yet)."""
    info = plan(coord).get(shard)
    return shard_status(info.address, shard_id=shard).version if info else -1


def copies_equal(coord):
    """Every shard has its two copies back, at one version and state digest."""
    for shard, info in plan(coord).items():
        copies = [shard_status(a, shard_id=shard, digest=True) for a in (info.address, *info.backups)]
        if len(copies) != 2 or len({(c.version, c.state_digest) for c in copies}) != 1:
            return False
    return True


def partitioned(tmp_path, spawn_workers, links, during):
    """Two workers on hosts of their own train a sync Adam job over 2 servers with 2 copies of each
    shard; once shard 0 reached CUT_AT, ``links`` (pairs of hosts) are cut, ``during(coord, cluster)``
    runs (it waits for what the cut must bring about), and the links are mended. Checks what every
    partition must leave (see the module's docstring); returns (the coordinator's status, the verdict)."""
    ok, reason = available()
    if not ok:
        pytest.skip(reason)
    with LocalCluster(servers=2, durable=False, hosts=True, worker_hosts=2, log_dir=tmp_path / "logs") as cluster, \
            CoordinatorClient(cluster.address) as coord:
        workers = spawn_workers(cluster, 2, optimizer="adam", kwargs=json.dumps(KWARGS), sizes="24,40", steps=STEPS,
                                replicas=2, sleep=0.05, transport="grpc")
        wait_until(lambda: version(coord, 0) >= CUT_AT, what=f"step {CUT_AT}")
        for a, b in links:
            cluster.network.cut(a, b)
        try:
            during(coord, cluster)
        finally:
            for a, b in links:
                cluster.network.mend(a, b)
        results = workers.wait(timeout=240)
        wait_until(lambda: copies_equal(coord), timeout=60, what="every shard's copies to agree again")
        status = coord.status()
        verdict = check_run(cluster.history_dir)
    assert verdict.ok, verdict.violations  # no push applied twice, one primary at a time, backups follow
    assert verdict.counts["acks"] >= 2 * 2 * STEPS
    assert not status.rollbacks
    ref, _ = reference(results[0]["initial"], "adam", KWARGS, SIZES, False, STEPS)
    for r in results:  # nothing lost, nothing doubled: what one process on the union batch gets
        assert r["rollbacks"] == 0
        for key, value in ref.items():
            assert (r["final"][key] - value).abs().max().item() <= 1e-5, key
    return status, verdict


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_primary_cut_from_the_coordinator_but_not_from_the_workers_is_replaced_and_never_applies_again(
        tmp_path, spawn_workers):
    """server-0 (shard 0's primary) loses the coordinator but still talks to the workers and to its
    backup: its lease runs out, so it stops answering; the backup is promoted and closes steps while
    the old primary is still reachable. Mended, server-0 comes back as a backup, catches up and takes
    its shard back."""
    def during(coord, cluster):
        old = cluster.server_address(0)
        wait_until(lambda: plan(coord)[0].address != old, timeout=60, what="shard 0 to fail over")
        at = version(coord, 0)
        wait_until(lambda: version(coord, 0) >= at + 3, timeout=60, what="steps closed by the promoted backup")

    status, _ = partitioned(tmp_path, spawn_workers, [("server-0", "coordinator")], during)
    assert [(f.shard_id, f.from_server, f.to_server, f.reason) for f in status.failovers][:1] == [(0, 0, 1, "dead")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_backup_cut_from_its_primary_is_dropped_the_job_goes_on_and_it_is_copied_back_when_mended(
        tmp_path, spawn_workers):
    """server-0 and server-1 hold each other's backups and cannot reach each other (both still reach
    the coordinator and the workers): each primary reports its backup unreachable, the coordinator
    drops it, and training goes on with one copy; nobody fails over (both primaries hold their leases).
    Mended, the backups are placed again and copied."""
    def during(coord, cluster):
        dropped = set()

        def both_dropped():  # (each may be placed back, on probation, before the other goes)
            dropped.update(k for k, s in plan(coord).items() if not s.backups)
            return dropped == {0, 1}

        wait_until(both_dropped, timeout=60, what="both unreachable backups to be dropped")
        at = version(coord, 0)
        wait_until(lambda: version(coord, 0) >= at + 5, timeout=60, what="steps closed with one copy")

    status, _ = partitioned(tmp_path, spawn_workers, [("server-0", "server-1")], during)
    assert [f for f in status.failovers if f.reason != "rebalance"] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_cut_from_one_shard_holds_the_step_until_mended_and_its_push_is_applied_once(
        tmp_path, spawn_workers):
    """worker-0 reaches shard 0 (and the coordinator) but not shard 1: a sync step cannot close on
    shard 1 without its push, so training waits (a timeout is no evidence of a dead server: nothing
    fails over). Mended, what waited in the cut link lands, once, and the job finishes."""
    def during(coord, cluster):
        def waiting():  # shard 1 has one worker's push of the open step and not the other's
            last = shard_status(cluster.server_address(1), shard_id=1).worker_last_step
            return len(set(last.values())) == 2

        # (worker-0's push to shard 1, or shard 1's answer to it, is the one caught in the cut link)
        wait_until(waiting, timeout=30, what="shard 1 to wait for worker-0")
        time.sleep(2.0)  # (that can be a healthy step's moment too: by now the cut has bitten ...)
        held = version(coord, 1)
        time.sleep(2.0)  # ... and it holds, longer than a push attempt's first retries
        assert version(coord, 1) == held and waiting()  # the step waits for what it cannot get

    status, _ = partitioned(tmp_path, spawn_workers, [("worker-0", "server-1")], during)
    assert list(status.failovers) == []
