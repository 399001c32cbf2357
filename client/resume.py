"""A job's checkpoint as a whole: assemble the shards' files, export them, re-cut them for resuming.

Each server checkpoints its own slice (``server/checkpoint.py``). This module finds
the newest version that *every* shard has a checkpoint of, and puts the slices back
together: the flat parameters, each parameter's optimizer state, the param groups'
hyper-parameters, the buffers, the job spec. From there:

- ``export_checkpoint``: the model (and optimizer) ``state_dict`` files, no cluster needed;
- ``prepare_resume``: the same state cut for a new number of servers, written as
  those servers' checkpoints, plus ``job.json`` that tells a new coordinator which
  job it runs and from which step (``shardps coordinator --resume-job``).

A streaming DiLoCo run (``fragments=F``) keeps its model in F jobs ``default.f<k>``, each
checkpointed under ``job-default.f<k>/``: ``load_model_checkpoints`` finds them, picks versions
of one moment of the run, and both functions above take them all.

    ckpt = load_job_checkpoint("runs/digits-1/checkpoints")
    prepare_resume(ckpt, num_servers=3, out_dir="runs/digits-2/checkpoints")
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..proto import buffers as buffer_file
from ..proto.assemble import (hyper_groups, merge_state, model_state_dict, optimizer_state_dict, param_states,
                              split_optimizer_state)
from ..proto.gen import shardps_pb2 as pb
from ..proto.messages import DEFAULT_JOB, JobConfig, fragment_jobs, job_from_pb
from ..proto.plan import DEFAULT_ALIGN, plan_shards
from ..server.checkpoint import CheckpointError, CheckpointStore, Snapshot

RESUME_FILE = "job.json"


@dataclass
class JobCheckpoint:
    job_id: str
    job_spec: bytes
    job: JobConfig
    version: int
    param: torch.Tensor  # the whole flat fp32 vector
    optimizer_state: dict[int, dict[str, torch.Tensor]]  # layout index -> its whole state, by torch's keys
    last_step: dict[int, int]  # the dedup table (the same on every shard of a sync job)
    source: Path
    hyper_json: str = ""  # the param groups' hyper-parameters at this version
    buffers: bytes | None = None  # the model's buffers file (shard 0's)


def checkpoint_root(path: str | Path) -> Path:
    """The folder holding ``shard-<k>/`` folders (and other jobs' ``job-<name>/shard-<k>/``): ``path``
    itself, or a run directory's ``checkpoints/``."""
    path = Path(path)
    for candidate in (path, path / "checkpoints", path / "logs" / "checkpoints"):
        if any(candidate.glob("shard-*/ckpt-*.safetensors")) or any(candidate.glob("job-*/shard-*/ckpt-*.safetensors")):
            return candidate
    raise CheckpointError(f"no shard checkpoints under {path} (looked for shard-*/ckpt-*.safetensors in it and in "
                          "its checkpoints/ folder); run servers with --checkpoint-dir")


def _job_dir(root: Path, job: str) -> Path:
    """Where the servers write job ``job``'s shards (``server/node.py``'s ``store``)."""
    return root if job == DEFAULT_JOB else root / f"job-{job}"


def _stores(root: Path, job: str) -> tuple[list[Path], list[CheckpointStore], set[int]]:
    """Job ``job``'s shard folders, their stores, and the versions every shard has a checkpoint of."""
    dirs = sorted((d for d in _job_dir(root, job).glob("shard-*") if re.fullmatch(r"shard-\d+", d.name)),
                  key=lambda d: int(d.name.split("-")[1]))
    if not dirs:
        raise CheckpointError(f"no checkpoints of job {job!r} under {root}")
    stores = [CheckpointStore(d) for d in dirs]
    common = set.intersection(*(set(s.versions()) for s in stores))
    if not common:
        raise CheckpointError(f"the shards of job {job!r} under {root} have no checkpoint version in common: "
                              + "; ".join(f"{d.name}: {s.versions()}" for d, s in zip(dirs, stores)))
    return dirs, stores, common


def load_job_checkpoint(path: str | Path, job: str = DEFAULT_JOB, version: int | None = None) -> JobCheckpoint:
    """Job ``job``'s checkpoint at ``version`` (default: the newest every shard has), assembled."""
    root = checkpoint_root(path)
    _, stores, common = _stores(root, job)
    if version is None:
        version = max(common)
    elif version not in common:
        raise CheckpointError(f"job {job!r} under {root} has no checkpoint of version {version} on every shard")
    snaps = sorted((s.load(version) for s in stores), key=lambda snap: snap.start)
    job_ids = {s.job_id for s in snaps}
    if len(job_ids) != 1:
        raise CheckpointError(f"the shards under {root} belong to different jobs: {sorted(job_ids)}")
    spec = job_from_pb(pb.JobSpec.FromString(snaps[0].job_spec))
    ranges = [(s.start, s.stop) for s in snaps]
    expected = [(a, b) for a, b in zip([0] + [s.stop for s in snaps[:-1]], [s.stop for s in snaps])]
    if ranges != expected or snaps[-1].stop != spec.layout.numel:
        raise CheckpointError(f"the shards under {root} do not cover [0, {spec.layout.numel}) exactly: {ranges}")
    return JobCheckpoint(snaps[0].job_id, snaps[0].job_spec, spec, version, torch.cat([s.param for s in snaps]),
                         param_states(spec.layout, [s.optimizer_state for s in snaps]), dict(snaps[0].last_step),
                         root, snaps[0].hyper_json, next((s.buffers for s in snaps if s.buffers is not None), None))


def load_model_checkpoints(path: str | Path, job: str = DEFAULT_JOB) -> list[JobCheckpoint]:
    """The checkpoints that hold job ``job``'s model: its own (one), or a streaming DiLoCo run's
    fragments (``<job>.f<k>``, in order; fragment 0's holds the buffers) at versions that belong
    together (below)."""
    root = checkpoint_root(path)
    if any(_job_dir(root, job).glob("shard-*/ckpt-*.safetensors")):
        return [load_job_checkpoint(root, job)]
    names = fragment_jobs(job, [d.name.removeprefix("job-") for d in root.glob("job-*")])
    if not names:
        raise CheckpointError(f"no checkpoints of job {job!r} (nor of its fragments) under {root}")
    return [load_job_checkpoint(root, name, v) for name, v in zip(names, _fragment_versions(root, names))]


def _fragment_versions(root: Path, names: list[str]) -> list[int]:
    """One checkpoint version per fragment, of one moment of the run. Fragment 0 syncs after inner
    steps H, 2H, ...; fragment k > 0 after k*H/F, then every H: after v*H inner steps every fragment
    holds version v (k > 0: v + 1 after the run's last, shorter round). So the newest version v of
    fragment 0 for which every other fragment has v or v + 1 (a crashed run's fragments may have
    their newest checkpoints at different moments)."""
    common = [_stores(root, name)[2] for name in names]
    for v in sorted(common[0], reverse=True):
        picked = [v] + [v + 1 if v + 1 in c else v for c in common[1:]]
        if all(p in c for p, c in zip(picked, common)):
            return picked
    raise CheckpointError(f"the fragments {', '.join(names)} under {root} have no checkpoints of one moment "
                          f"(versions: {[sorted(c) for c in common]})")


def export_checkpoint(path: str | Path, out: str | Path, optimizer_state: bool = False) -> dict:
    """Write the model (and optionally the optimizer state) of a job checkpoint, as ``shardps export`` does
    (a streaming DiLoCo run's: every fragment's parameters in one file)."""
    from .sdk import _atomic_save

    ckpts = load_model_checkpoints(path)
    first = ckpts[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shardps_job_id": first.job_id, "versions": json.dumps([first.version]),
            "fingerprint": first.job.layout.fingerprint}
    if len(ckpts) > 1:
        meta["fragments"] = json.dumps({c.job.name: [c.version] for c in ckpts})
    buffers = buffer_file.decode(first.buffers) if first.buffers else {}
    model = model_state_dict(first.job.layout, first.param, buffers)
    for c in ckpts[1:]:
        model.update(model_state_dict(c.job.layout, c.param, {}))
    _atomic_save(model, out, meta)
    optim_path = None
    if optimizer_state:
        optim_path = out.with_name(out.stem + ".optim.pt")
        parts = []
        for c in ckpts:
            whole = split_optimizer_state(c.job, {"state": c.optimizer_state}, [plan_shards(c.job.layout.numel, 1)[0]])
            parts.append(optimizer_state_dict(c.job, whole, hyper_groups(c.job, c.hyper_json)))
        _atomic_save(merge_state(parts), optim_path, None)
    result: dict[str, object] = {"model": str(out), "optimizer": str(optim_path) if optim_path else None,
                                 "version": first.version, "numel": sum(c.job.layout.numel for c in ckpts),
                                 "source": str(first.source)}
    if len(ckpts) > 1:
        result["fragments"] = {c.job.name: c.version for c in ckpts}
    return result


def prepare_resume(ckpts: JobCheckpoint | list[JobCheckpoint], num_servers: int, out_dir: str | Path,
                   align: int = DEFAULT_ALIGN) -> Path:
    """Cut each of ``ckpts`` (one job's, or a streaming run's fragments') for ``num_servers`` servers
    and write their checkpoints into ``out_dir`` where the servers look for them (``shard-<k>/``;
    another job's under ``job-<name>/``), plus ``out_dir/job.json`` for the coordinator, which
    resumes every job in it. Returns that file's path."""
    out_dir = Path(out_dir)
    specs = []
    for ckpt in ckpts if isinstance(ckpts, list) else [ckpts]:
        ranges = plan_shards(ckpt.job.layout.numel, num_servers, align)
        states = split_optimizer_state(ckpt.job, {"state": ckpt.optimizer_state}, ranges)
        for r, state in zip(ranges, states):
            snap = Snapshot(ckpt.job_id, ckpt.job_spec, r.shard_id, r.start, r.stop, ckpt.version,
                            dict(ckpt.last_step), ckpt.param[r.start:r.stop].clone(),
                            {k: v.clone() for k, v in state.items()}, ckpt.hyper_json,
                            ckpt.buffers if r.shard_id == 0 else None)
            CheckpointStore(_job_dir(out_dir, ckpt.job.name) / f"shard-{r.shard_id}").write(snap)
        specs.append({"job_id": ckpt.job_id, "job_spec": base64.b64encode(ckpt.job_spec).decode(),
                      "version": ckpt.version, "from": str(ckpt.source)})
    path = out_dir / RESUME_FILE
    path.write_text(json.dumps(specs[0] if len(specs) == 1 else {"jobs": specs}, indent=2) + "\n")
    return path
