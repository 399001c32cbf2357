"""Replicated shards (``replicas=2``): a SIGKILLed primary fails over to its in-sync backup, nothing
rolls back, and a sync run ends bit-identical to the fault-free run (real processes, no checkpoints)."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from shardps import LocalCluster, chaos
from shardps.chaos.checker import check_run
from shardps.runtime.faults import FaultRule
from shardps.client.sdk import cluster_status, shard_status
from shardps.coordinator.client import CoordinatorClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from task import reference  # noqa: E402
from waiting import wait_until  # noqa: E402

STEPS = 60
OPTS = dict(optimizer="adam", kwargs=json.dumps({"lr": 0.01}), sizes="16,16", steps=STEPS, replicas=2, sleep=0.02,
            init_seed=7)  # both runs start from the same parameters (the initializer's)


def plan(coord):
    return {s.range.shard_id: s for s in coord.job()[2]}


def primary_version(cluster, coord, shard):
    """The version of ``shard`` on its primary (-1 while the job is not defined yet)."""
    info = plan(coord).get(shard)
    return shard_status(info.address, shard_id=shard).version if info else -1


def finals(workers):
    workers.wait(timeout=300)
    return [torch.load(out)["final"] for out in workers.outs]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def replicas_agree(cluster, coord, shard):
    """Every copy of ``shard`` has the same version and state digest; returns the copies' statuses."""
    info = plan(coord)[shard]
    copies = [shard_status(a, shard_id=shard, digest=True) for a in (info.address, *info.backups)]
    assert len({(c.version, c.state_digest) for c in copies}) == 1, [(c.version, c.state_digest) for c in copies]
    return copies


PAIR_SIZES, PAIR_KWARGS = [24, 40], {"lr": 0.01}


def spawn_pair(spawn_workers, cluster, steps, sleep=0.05):
    """Two workers (batches of 24 and 40) of a sync Adam job with two copies of each shard."""
    return spawn_workers(cluster, 2, optimizer="adam", kwargs=json.dumps(PAIR_KWARGS),
                         sizes=",".join(map(str, PAIR_SIZES)), steps=steps, replicas=2, sleep=sleep)


def assert_as_in_one_process(results, steps):
    """Nothing rolled back, and every worker ends with what plain torch.optim.Adam on the union batch
    gives (a push applied twice, or lost, would change it)."""
    ref_params, _ = reference(results[0]["initial"], "adam", PAIR_KWARGS, PAIR_SIZES, False, steps)
    for r in results:
        assert r["rollbacks"] == 0
        for key, value in ref_params.items():
            assert (r["final"][key] - value).abs().max().item() <= 1e-5, key


def kill_primary_and_rejoin(cluster, coord, shard, at):
    """Once shard ``shard``'s primary reached step ``at``, SIGKILL it: its in-sync backup takes the
    shard over; restart it: it rejoins as a backup and catches up from the live copy."""
    wait_until(lambda: primary_version(cluster, coord, shard) >= at, what=f"step {at}")
    before = plan(coord)[shard]
    cluster.kill(f"server-{shard}")  # shard k's primary is server k until it fails over
    after = wait_until(lambda: (p := plan(coord)[shard]).address != before.address and p, timeout=60,
                       what=f"shard {shard} to fail over")
    assert after.address == before.backups[0]  # its in-sync backup took over
    cluster.restart(f"server-{shard}")  # rejoins as a backup; its primary sends it a whole copy
    wait_until(lambda: len(plan(coord)[shard].backups) == 1 and replicas_agree(cluster, coord, shard),
               timeout=60, what=f"server-{shard} to rejoin shard {shard}")


@pytest.mark.slow
def test_each_primary_killed_in_turn_fails_over_without_rollback_and_the_run_is_bit_identical(spawn_workers, tmp_path):
    with LocalCluster(servers=3, durable=False) as cluster:
        reference = finals(spawn_workers(cluster, 2, **OPTS))

    with LocalCluster(servers=3, durable=False, log_dir=tmp_path / "logs") as cluster, \
            CoordinatorClient(cluster.address) as coord:
        workers = spawn_workers(cluster, 2, **OPTS)
        for shard, at in ((0, 12), (1, 28), (2, 44)):
            kill_primary_and_rejoin(cluster, coord, shard, at)
        result = finals(workers)
        for shard in range(3):
            copies = replicas_agree(cluster, coord, shard)
            assert copies[0].version == STEPS  # every step closed exactly once on the shard's line of replicas
            assert copies[0].rollbacks == 0 and copies[0].steps_rolled_back == 0
        status = coord.status()
        assert not status.rollbacks
    for got in result:
        assert max_diff(reference[0], got) == 0.0  # bit-identical to the fault-free run


def injected(cluster, name):
    return chaos.get_rpc_faults(cluster, name)[name]["injected"].get("abort/Push", 0)


@pytest.mark.slow
def test_a_retry_storm_across_a_failover_applies_every_push_once(spawn_workers):
    """40 % of push replies are lost after the shard applied the push, and shard 0's primary is
    SIGKILLed mid-run: the retries land on the promoted backup, which answers the pushes its
    primary applied as duplicates (its dedup table is the primary's) and applies the others."""
    steps = 30
    with LocalCluster(servers=2, durable=False) as cluster, CoordinatorClient(cluster.address) as coord:
        chaos.set_rpc_faults(cluster, "servers", [
            FaultRule(kind="abort", method="Push", status="UNAVAILABLE", probability=0.4, after=True)])
        workers = spawn_pair(spawn_workers, cluster, steps, sleep=0.02)
        wait_until(lambda: primary_version(cluster, coord, 0) >= 10, what="step 10")
        lost = injected(cluster, "server-0")
        cluster.kill("server-0")
        results = workers.wait(timeout=300)
        lost += injected(cluster, "server-1")
        survivor = [shard_status(cluster.server_address(1), shard_id=k) for k in (0, 1)]
        shown = cluster_status(cluster.address)["shards"]
    assert lost >= 5  # the storm happened
    assert [(s["replica_role"], s["server_holds_shards"], s["address"]) for s in shown] == \
        [("primary", [1, 0], cluster.server_address(1))] * 2  # status: both shards served by server-1
    assert shown[0]["copies_sent"] == 0 and shown[1]["updates_replicated"] >= 10  # nothing to copy to after the kill
    assert all(s.version == steps and s.replica_role == "primary" for s in survivor)  # one update per step
    assert sum(s.pushes_duplicate for s in survivor) >= 1  # retried pushes were answered, not applied again
    assert all(s.rollbacks == 0 for s in survivor)
    assert all(r["versions"] == [steps, steps] for r in results)
    assert_as_in_one_process(results, steps)


@pytest.mark.slow
def test_a_paused_primary_is_replaced_and_when_it_wakes_it_cannot_close_a_step(spawn_workers):
    """SIGSTOP shard 0's primary (it keeps its sockets, so calls to it hang rather than fail): its lease
    runs out, the backup is promoted, the workers' hanging calls move there; SIGCONT it: it answers
    nothing as a primary any more (no split brain), rejoins as a backup and catches up."""
    steps = 40
    with LocalCluster(servers=2, durable=False) as cluster, CoordinatorClient(cluster.address) as coord:
        workers = spawn_pair(spawn_workers, cluster, steps)
        wait_until(lambda: primary_version(cluster, coord, 0) >= 10, what="step 10")
        paused = cluster.server_address(0)
        cluster.pause("server-0")
        wait_until(lambda: plan(coord)[0].address != paused, timeout=60, what="shard 0 to fail over")
        at = primary_version(cluster, coord, 0)
        wait_until(lambda: primary_version(cluster, coord, 0) >= at + 3, timeout=60,
                   what="steps closed by the promoted backup while the old primary sleeps")
        cluster.resume("server-0")
        results = workers.wait(timeout=300)
        wait_until(lambda: plan(coord)[0].address == paused and replicas_agree(cluster, coord, 0), timeout=60,
                   what="server-0 to catch up and take its shard back")
        copies = [replicas_agree(cluster, coord, k) for k in (0, 1)]
        failovers = coord.status().failovers
    assert all(c[0].version == steps and c[0].rollbacks == 0 for c in copies)
    assert [(f.shard_id, f.reason) for f in failovers][:1] == [(0, "dead")]
    assert_as_in_one_process(results, steps)


@pytest.mark.slow
def test_a_placement_call_a_paused_primary_takes_late_grants_it_no_lease(spawn_workers):
    """The coordinator counts a primary's lease from its last answer. A call the primary takes only
    when it wakes (it sat in the paused process's socket) must grant nothing past that: the lease runs
    from the primary's own clock in its answer before, echoed by the call, not from when it was read.
    Pause shard 0's primary, let the coordinator send it a placement call, pause the coordinator
    too (it can neither promote nor send more), wait out the lease and wake the primary alone."""
    steps = 30
    with LocalCluster(servers=2, durable=False) as cluster, CoordinatorClient(cluster.address) as coord:
        workers = spawn_pair(spawn_workers, cluster, steps)
        wait_until(lambda: primary_version(cluster, coord, 0) >= 5, what="step 5")
        address = cluster.server_address(0)
        assert shard_status(address, shard_id=0).lease_remaining_ms > 0  # a live primary holds a lease
        cluster.pause("server-0")
        try:
            time.sleep(0.6)  # the coordinator sends placement calls every 0.25 s: some wait in the socket
            cluster.pause("coordinator")
            time.sleep(3.0)  # past the lease (1.5 s) the coordinator counts from server-0's last answer
            cluster.resume("server-0")  # it takes the waiting calls now
            time.sleep(0.5)
            status = shard_status(address, shard_id=0)
        finally:
            cluster.resume("server-0")
            cluster.resume("coordinator")
        assert status.replica_role == "primary"  # what it last heard: nobody told it otherwise
        assert status.lease_remaining_ms == 0  # but it serves nothing: no split brain
        results = workers.wait(timeout=300)
        assert not coord.status().rollbacks
    assert_as_in_one_process(results, steps)


@pytest.mark.slow
def test_a_primary_killed_right_after_a_coordinator_restart_still_fails_over(spawn_workers, tmp_path):
    """The placement (and which backups are in sync) is journaled: a coordinator that just restarted,
    before any server has answered it, promotes the in-sync backup of a primary killed then."""
    steps = 30
    with LocalCluster(servers=2, log_dir=tmp_path / "logs") as cluster, \
            CoordinatorClient(cluster.address) as coord:
        workers = spawn_pair(spawn_workers, cluster, steps)
        wait_until(lambda: primary_version(cluster, coord, 0) >= 8, what="step 8")
        cluster.restart("coordinator")
        cluster.kill("server-0")
        wait_until(lambda: plan(coord)[0].address == cluster.server_address(1), timeout=60,
                   what="shard 0 to fail over")
        results = workers.wait(timeout=300)
        survivor = [shard_status(cluster.server_address(1), shard_id=k) for k in (0, 1)]
        status = coord.status()
    assert not status.rollbacks and [f.reason for f in status.failovers] in (["dead"], ["refused"])
    assert all(s.version == steps and s.rollbacks == 0 for s in survivor)
    assert_as_in_one_process(results, steps)


@pytest.mark.slow
def test_a_killed_primary_fails_over_on_the_workers_report_of_its_refused_port_not_after_its_lease(
        spawn_workers, tmp_path):
    """With a 60 s primary lease, silence alone would keep shard 0 waiting for a minute. The workers'
    calls to the SIGKILLed primary are refused; they name it when they ask where the shard is, the
    coordinator finds its port refusing too and promotes the in-sync backup at once (the failover's
    recorded reason is "refused", not "dead"). Nothing rolls back, the recorded history proves every
    push applied once under one primary at a time, and the run equals one process's."""
    steps = 30
    with LocalCluster(servers=2, durable=False, log_dir=tmp_path / "logs", replica_lease_seconds=60) as cluster, \
            CoordinatorClient(cluster.address) as coord:
        workers = spawn_pair(spawn_workers, cluster, steps)
        wait_until(lambda: primary_version(cluster, coord, 0) >= 10, what="step 10")
        alive = cluster.server_address(0)
        # A worker's word alone moves nothing: the coordinator checks, and a live server answers it.
        assert {s.range.shard_id: s.address for s in coord.job(suspect=[alive])[2]}[0] == alive
        assert not coord.status().failovers
        cluster.kill("server-0")
        results = workers.wait(timeout=300)
        failovers = coord.status().failovers
        survivor = [shard_status(cluster.server_address(1), shard_id=k) for k in (0, 1)]
        verdict = check_run(cluster.history_dir)
    assert [(f.shard_id, f.from_server, f.to_server, f.reason) for f in failovers] == [(0, 0, 1, "refused")]
    assert all(s.version == steps and s.rollbacks == 0 and s.replica_role == "primary" for s in survivor)
    assert verdict.ok, verdict.violations
    assert verdict.counts["acks"] >= 2 * 2 * steps  # the workers' replies were recorded and checked
    assert_as_in_one_process(results, steps)


def test_the_embedded_clusters_primary_lease_reaches_its_coordinator_and_a_bad_one_is_refused_by_name():
    from shardps.client.local import ClusterError

    with pytest.raises(ClusterError, match="replica_lease_seconds must be in 0.2..600, got 0.1"):
        with LocalCluster(servers=1, durable=False, replica_lease_seconds=0.1):
            pass
