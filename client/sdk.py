"""The Python SDK behind the ``shardps`` command: status, export and the single-process reference.

    status = cluster_status("127.0.0.1:7070")          # JSON-able dict
    export_model("127.0.0.1:7070", "model.safetensors", optimizer_state=True)
    baseline = train_single_process("digits", epochs=15, batch_size=64)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import torch

from ..coordinator.client import CoordinatorClient
from ..proto import buffers as buffer_file
from ..proto.assemble import hyper_groups, merge_state, model_state_dict, optimizer_state_dict
from ..proto.errors import FailedPrecondition, Unavailable
from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from ..proto.messages import DEFAULT_JOB, added_group_jobs, fragment_jobs, job_from_pb, mode_from_pb, view_from_pb
from ..runtime.rpc import CONTROL_TIMEOUT_S, open_channel
from ..runtime.status import error_from_rpc


def shard_status(address: str, timeout: float = CONTROL_TIMEOUT_S, job_id: str = "",
                 security=None, shard_id: int | None = None, digest: bool = False) -> pb.GetShardStatusResponse:
    """The status of the server's own shard of ``job_id`` (or, with ``shard_id``, of the replica of that
    shard it holds; ``digest``: with a SHA-256 over its state)."""
    request = pb.GetShardStatusRequest(job_id=job_id, include_digest=digest)
    if shard_id is not None:
        request.shard_id = shard_id
    with open_channel(address, security) as channel:
        try:
            return pb_grpc.ShardServiceStub(channel).GetShardStatus(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"GetShardStatus at {address}") from None


def _staleness_summary(counts: dict[int, int]) -> dict:
    n = sum(counts.values())
    if not n:
        return {"count": 0}
    return {"count": n, "mean": sum(k * v for k, v in counts.items()) / n, "max": max(counts),
            "histogram": {str(k): v for k, v in sorted(counts.items())}}


def cluster_status(address: str, job: str = "", security=None) -> dict:
    """Job ``job`` (default: the job named "default"), its membership and every shard's counters
    for it, as plain JSON-able data; ``jobs`` lists every job of the cluster. A streaming DiLoCo job
    (no job of that name, its fragments ``<job>.f<k>`` instead) answers for all its fragments:
    ``fragments`` names them, ``shards`` holds fragment 0's shards, then fragment 1's, ... (each
    entry with its ``job``), ``job`` is fragment 0's with the whole model's ``numel``."""
    with CoordinatorClient(address, security=security) as coord:
        st = coord.status(job)
    fragments = [] if st.job_id else fragment_jobs(job or DEFAULT_JOB, st.job_names)
    if fragments:
        return _fragments_status([cluster_status(address, f, security) for f in fragments], fragments)
    out: dict = {"coordinator": address, "job_id": st.job_id, "num_servers": st.num_servers, "job": None,
                 "jobs": list(st.job_names), "coordinator_generation": st.generation, "added_groups": []}
    if st.job_id:
        job = job_from_pb(st.job)
        out["job"] = {"mode": job.mode.value, "optimizer": job.optimizer, "optimizer_kwargs": job.optimizer_kwargs,
                      "numel": job.layout.numel, "fingerprint": job.layout.fingerprint,
                      "min_workers": job.min_workers, "parameters": len(job.layout.params),
                      "backup_workers": job.backup_workers, "staleness_lr": job.staleness_lr,
                      "staleness_bound": job.staleness_bound, "replicas": job.replicas}
        # Param groups added during training are jobs of their own (worker/param_groups.py).
        out["added_groups"] = added_group_jobs(job.name, st.job_names)
    view = view_from_pb(st.view)
    shards = []
    addresses = {s.shard_id: s.address for s in st.servers}
    last_seen: dict[int, float] = {}
    placed = {a.shard_id: a for a in st.plan.shards if a.backups or st.job.replicas > 1}  # replicated: primaries
    for shard_id in range(st.num_servers):
        entry = {"shard_id": shard_id, "address": addresses.get(shard_id, "")}
        if shard_id in placed:
            entry.update(address=placed[shard_id].address, backups=list(placed[shard_id].backups))
        if entry["address"]:
            try:
                s = shard_status(entry["address"], job_id=st.job_id, security=security,
                                 shard_id=shard_id if shard_id in placed else None)
            except Exception as exc:  # one unreachable shard must not hide the others
                entry["error"] = str(exc)
            else:
                entry.update(
                    range=[s.start, s.stop], initialized=s.initialized, version=s.version,
                    mode=mode_from_pb(s.mode).value if s.mode else "", pushes=s.pushes_received,
                    rejected=s.pushes_rejected, duplicates=s.pushes_duplicate, dropped=s.pushes_dropped,
                    skipped=s.pushes_skipped,
                    bytes_in=s.bytes_in, wait_seconds=s.wait_seconds,
                    bytes_out=s.bytes_out, shm_bytes_in=s.shm_bytes_in, shm_bytes_out=s.shm_bytes_out,
                    transport={str(w): t for w, t in sorted(s.worker_transport.items())}, apply_seconds=s.apply_seconds, rejections=dict(s.rejections),
                    staleness=_staleness_summary(dict(s.staleness_counts)),
                    rollbacks=s.rollbacks, steps_rolled_back=s.steps_rolled_back,
                    checkpoints_written=s.checkpoints_written, checkpoint_failures=s.checkpoint_failures,
                    last_checkpoint_version=s.last_checkpoint_version,
                    restored_from_version=s.restored_from_version if s.restored else None,
                )
                if s.replica_role:  # a replicated job: the primary's replication counters
                    entry.update(replica_role=s.replica_role, placement_epoch=s.placement_epoch,
                                 updates_replicated=s.updates_replicated, copies_sent=s.copies_sent,
                                 lease_remaining_ms=s.lease_remaining_ms, server_holds_shards=list(s.replica_shards))
                for w, t in s.worker_last_push_unix.items():
                    last_seen[w] = max(t, last_seen.get(w, 0.0))
        shards.append(entry)
    out["membership"] = {
        "epoch": view.epoch,
        "workers": [{"worker_id": m.worker_id, "rank": m.rank, "name": m.name, "device": m.device,
                     "last_seen_unix": last_seen.get(m.worker_id)} for m in view.members],
        "pending": [{"worker_id": m.worker_id, "name": m.name} for m in st.pending],
        "left": list(st.left_worker_ids),
        "expired": list(st.expired_worker_ids),
        "waiting_for": st.waiting_for,
        "heartbeat_age_s": {str(w): round(a, 3) for w, a in st.heartbeat_age_s.items()},
        "worker_counters": {str(w): {"step": c.step, **dict(c.counters)} for w, c in st.worker_counters.items()},
    }
    out["shards"] = shards
    out["faults_injected"] = _faults_injected(address, addresses, security)
    out["rollbacks"] = [{"shard_id": r.shard_id, "from_version": r.from_version, "to_version": r.to_version,
                         "steps": r.from_version - r.to_version, "epoch": r.epoch, "unix_time": r.unix_time}
                        for r in st.rollbacks]
    out["failovers"] = [{"shard_id": f.shard_id, "from_server": f.from_server, "to_server": f.to_server,
                         "placement_epoch": f.placement_epoch, "unix_time": f.unix_time, "reason": f.reason}
                        for f in st.failovers]
    return out


def _fragments_status(parts: list[dict], names: list[str]) -> dict:
    """One status of a streaming DiLoCo job from its fragments' (see ``cluster_status``)."""
    out = dict(parts[0], fragments=names)
    out["job"] = dict(parts[0]["job"], numel=sum(p["job"]["numel"] for p in parts),
                      parameters=sum(p["job"]["parameters"] for p in parts))
    for key in ("shards", "rollbacks", "failovers"):
        out[key] = [dict(entry, job=name) for name, p in zip(names, parts) for entry in p[key]]
    return out


def _faults_injected(coordinator: str, servers: dict[int, str], security=None) -> dict[str, dict[str, int]]:
    """RPC faults each role injected so far ("kind/method" -> count); roles that do not answer are left out."""
    out = {}
    for name, address in [("coordinator", coordinator), *((f"server-{i}", a) for i, a in sorted(servers.items()))]:
        with open_channel(address, security) as channel:
            try:
                reply = pb_grpc.AdminServiceStub(channel).GetFaults(pb.GetFaultsRequest(), timeout=CONTROL_TIMEOUT_S)
            except grpc.RpcError:
                continue
        if reply.injected:
            out[name] = dict(reply.injected)
    return out


def export_model(address: str, out: str | os.PathLike, optimizer_state: bool = False, job: str = "",
                 security=None) -> dict:
    """Assemble the model's ``state_dict`` (names, shapes, dtypes) from the shards and write it.
    Param groups added during training (jobs of their own, ``<job>.g<index>``) are part of it; so
    are a streaming DiLoCo job's fragments (``<job>.f<k>``, when no job is named ``job``: together
    they hold the model, fragment 0 its buffers).

    ``.safetensors`` files are written with safetensors, anything else with ``torch.save``.
    With ``optimizer_state`` the torch.optim-shaped state goes to ``<stem>.optim.pt``.
    Returns {"model": path, "optimizer": path or None, "versions": [...], "numel": n, "added_groups": {...}}
    (and, for fragments, "fragments": {name: versions}; "versions" then lists every fragment's shards).
    """
    with CoordinatorClient(address, security=security) as coord:
        job_id, spec, plan = coord.job(job)
        names = coord.status(job).job_names
        fragments = [] if job_id else fragment_jobs(job or DEFAULT_JOB, names)
        if not job_id and not fragments:
            raise FailedPrecondition(f"the cluster at {address} has no job {job or 'default'!r}: nothing to export")
        if fragments:
            jobs, added = [(name, *coord.job(name)) for name in fragments], []
        else:
            added = [(name, *coord.job(name)) for name in added_group_jobs(spec.name, names)]
            jobs = [(spec.name, job_id, spec, plan), *added]
    jobs = [j for j in jobs if j[1]]
    parts = [_pull_job(i, s, p, optimizer_state, security) for _, i, s, p in jobs]
    specs = [s for _, _, s, _ in jobs]
    blob = parts[0][2]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shardps_job_id": jobs[0][1], "versions": json.dumps(parts[0][0]), "fingerprint": specs[0].layout.fingerprint}
    model = model_state_dict(specs[0].layout, parts[0][1], buffer_file.decode(blob) if blob is not None else {})
    for part_job, (_, part_flat, _, _) in zip(specs[1:], parts[1:]):
        model.update(model_state_dict(part_job.layout, part_flat, {}))
    by_name = {name: part[0] for (name, *_), part in zip(jobs, parts)}
    if added:
        meta["added_groups"] = json.dumps({name: by_name[name] for name, *_ in added if name in by_name})
    if fragments:
        meta["fragments"] = json.dumps(by_name)
    _atomic_save(model, path, meta)
    optim_path = None
    if optimizer_state:
        optim_path = path.with_name(path.stem + ".optim.pt")
        whole = merge_state([optimizer_state_dict(j, [t for _, t, _ in part[3]], hyper_groups(j, part[3][0][2]))
                             for j, part in zip(specs, parts)])
        _atomic_save(whole, optim_path, None)
    result = {"model": str(path), "optimizer": str(optim_path) if optim_path else None,
              "versions": [v for part in parts for v in part[0]] if fragments else parts[0][0],
              "numel": sum(j.layout.numel for j in specs),
              "added_groups": {name: by_name[name] for name, *_ in added if name in by_name}}
    if fragments:
        result["fragments"] = by_name
    return result


def _pull_job(job_id: str, job, plan, optimizer_state: bool, security) -> tuple:
    """(versions, flat parameters, buffers file or None, [(version, tensors, hyper json)] or None) of one job."""
    from ..worker.ps_client import PSClient

    ps = PSClient(plan, job_id, job.layout.fingerprint, chunk_bytes=1 << 20, timeout=120.0, security=security)
    try:
        if optimizer_state:
            shards = ps.pull_state()
            found = next((t["buffers"] for _, t, _ in shards if "buffers" in t), None)
            return ([v for v, _, _ in shards], torch.cat([t["param"] for _, t, _ in shards]),
                    found.numpy().tobytes() if found is not None else None, shards)
        flat = torch.empty(job.layout.numel)
        versions, blob = ps.pull(flat, buffers=True)
        return versions, flat, blob, None
    finally:
        ps.close()


def _atomic_save(obj, path: Path, metadata: dict | None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(obj, str(tmp), metadata=metadata)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_model_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an exported model (safetensors or torch file) into a state_dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def train_single_process(workload: str, *, workers: int = 2, batch_size: int = 0, steps: int = 0,
                         epochs: float = 0.0, optimizer: str = "", lr: float = 0.0, seed: int = 0) -> dict:
    """The reference a sync run must match: one process, plain ``torch.optim``, on the union batch
    of ``workers`` workers (``workers * batch_size`` samples per step), same data order."""
    from ..proto import optim
    from ..worker.workloads import get_workload

    wl = get_workload(workload, seed)
    d = wl.defaults
    batch_size = batch_size or d.batch_size
    union = batch_size * workers
    steps = steps or wl.steps_for(epochs or d.epochs, union)
    name = optimizer or d.optimizer
    model = wl.model()
    opt = optim.OPTIMIZERS[name](model.parameters(), **optim.full_defaults(name, {"lr": lr or d.lr}))
    start, losses = time.perf_counter(), []
    for step in range(steps):
        x, y = wl.global_batch(step, union)
        loss = wl.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return {"steps": steps, "final_loss": losses[-1], "wall_s": time.perf_counter() - start,
            **wl.evaluate(model), "model": model}


def checkpoint_cluster(address: str, timeout: float = 120.0, job: str = "", security=None) -> list[dict]:
    """Checkpoint every shard at one common version, the highest any shard has reached (a shard
    behind it writes when it gets there), and wait until all are on disk.

    Returns one {"shard_id", "version", "path", "bytes"} per shard (a streaming DiLoCo job: per shard of
    every fragment, each fragment's job at its own newest version, with its "job"). Raises the shard's own error
    (e.g. RESOURCE_EXHAUSTED: disk full; the previous checkpoint is intact). An operator's call:
    ``security`` (or SHARDPS_CLUSTER_TOKEN) must hold the cluster's credential.
    """
    from concurrent.futures import ThreadPoolExecutor

    st = cluster_status(address, job, security)
    if st.get("fragments"):  # a streaming DiLoCo job: each fragment's job at its own newest version
        return [dict(row, job=name) for name in st["fragments"]
                for row in checkpoint_cluster(address, timeout, name, security)]
    if not st["job_id"]:
        raise FailedPrecondition(f"the cluster at {address} has no job yet: nothing to checkpoint")
    broken = [s for s in st["shards"] if "version" not in s]
    if broken:
        raise Unavailable(f"shard {broken[0]['shard_id']} does not answer: {broken[0].get('error', 'not registered')}")
    version = max(s["version"] for s in st["shards"])

    def one(shard):
        request = pb.CheckpointRequest(at_version=version, timeout_ms=int(timeout * 1000), job_id=st["job_id"])
        with open_channel(shard["address"], security) as channel:
            try:
                reply = pb_grpc.ShardServiceStub(channel).Checkpoint(request, timeout=timeout + 10)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, f"Checkpoint at shard {shard['shard_id']} ({shard['address']})") from None
        return {"shard_id": shard["shard_id"], "version": reply.version, "path": reply.path, "bytes": reply.bytes}

    with ThreadPoolExecutor(len(st["shards"])) as pool:
        return list(pool.map(one, st["shards"]))
