"""A job's checkpoint as a whole: assemble the shards' files, export them, re-cut them for resuming.

Each server checkpoints its own slice (``server/checkpoint.py``). This module finds
the newest version that *every* shard has a checkpoint of, and puts the slices back
together: the flat parameters, each parameter's optimizer state, the param groups'
hyper-parameters, the buffers, the job spec. From there:

- ``export_checkpoint``: the model (and optimizer) ``state_dict`` files, no cluster needed;
- ``prepare_resume``: the same state cut for a new number of servers, written as
  those servers' checkpoints, plus ``job.json`` that tells a new coordinator which
  job it runs and from which step (``shardps coordinator --resume-job``).

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
from ..proto.assemble import (hyper_groups, model_state_dict, optimizer_state_dict, param_states,
                              split_optimizer_state)
from ..proto.gen import shardps_pb2 as pb
from ..proto.messages import JobConfig, job_from_pb
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
    """The folder holding ``shard-<k>/`` folders: ``path`` itself, or a run directory's ``checkpoints/``."""
    path = Path(path)
    for candidate in (path, path / "checkpoints", path / "logs" / "checkpoints"):
        if any(candidate.glob("shard-*/ckpt-*.safetensors")):
            return candidate
    raise CheckpointError(f"no shard checkpoints under {path} (looked for shard-*/ckpt-*.safetensors in it and in "
                          "its checkpoints/ folder); run servers with --checkpoint-dir")


def load_job_checkpoint(path: str | Path) -> JobCheckpoint:
    """The newest version every shard has a checkpoint of, assembled."""
    root = checkpoint_root(path)
    dirs = sorted((d for d in root.glob("shard-*") if re.fullmatch(r"shard-\d+", d.name)),
                  key=lambda d: int(d.name.split("-")[1]))
    stores = [CheckpointStore(d) for d in dirs]
    common = set.intersection(*(set(s.versions()) for s in stores))
    if not common:
        raise CheckpointError(f"the shards under {root} have no checkpoint version in common: "
                              + "; ".join(f"{d.name}: {s.versions()}" for d, s in zip(dirs, stores)))
    version = max(common)
    snaps = sorted((s.load(version) for s in stores), key=lambda snap: snap.start)
    job_ids = {s.job_id for s in snaps}
    if len(job_ids) != 1:
        raise CheckpointError(f"the shards under {root} belong to different jobs: {sorted(job_ids)}")
    job = job_from_pb(pb.JobSpec.FromString(snaps[0].job_spec))
    ranges = [(s.start, s.stop) for s in snaps]
    expected = [(a, b) for a, b in zip([0] + [s.stop for s in snaps[:-1]], [s.stop for s in snaps])]
    if ranges != expected or snaps[-1].stop != job.layout.numel:
        raise CheckpointError(f"the shards under {root} do not cover [0, {job.layout.numel}) exactly: {ranges}")
    return JobCheckpoint(snaps[0].job_id, snaps[0].job_spec, job, version, torch.cat([s.param for s in snaps]),
                         param_states(job.layout, [s.optimizer_state for s in snaps]), dict(snaps[0].last_step),
                         root, snaps[0].hyper_json, next((s.buffers for s in snaps if s.buffers is not None), None))


def export_checkpoint(path: str | Path, out: str | Path, optimizer_state: bool = False) -> dict:
    """Write the model (and optionally the optimizer state) of a job checkpoint, as ``shardps export`` does."""
    from .sdk import _atomic_save

    ckpt = load_job_checkpoint(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shardps_job_id": ckpt.job_id, "versions": json.dumps([ckpt.version]),
            "fingerprint": ckpt.job.layout.fingerprint}
    buffers = buffer_file.decode(ckpt.buffers) if ckpt.buffers else {}
    _atomic_save(model_state_dict(ckpt.job.layout, ckpt.param, buffers), out, meta)
    optim_path = None
    if optimizer_state:
        optim_path = out.with_name(out.stem + ".optim.pt")
        whole = split_optimizer_state(ckpt.job, {"state": ckpt.optimizer_state},
                                      [plan_shards(ckpt.job.layout.numel, 1)[0]])
        _atomic_save(optimizer_state_dict(ckpt.job, whole, hyper_groups(ckpt.job, ckpt.hyper_json)), optim_path,
                     None)
    return {"model": str(out), "optimizer": str(optim_path) if optim_path else None, "version": ckpt.version,
            "numel": ckpt.job.layout.numel, "source": str(ckpt.source)}


def prepare_resume(ckpt: JobCheckpoint, num_servers: int, out_dir: str | Path, align: int = DEFAULT_ALIGN) -> Path:
    """Cut ``ckpt`` for ``num_servers`` servers and write their checkpoints into ``out_dir`` (as
    ``shard-<k>/``), plus ``out_dir/job.json`` for the coordinator. Returns that file's path."""
    out_dir = Path(out_dir)
    ranges = plan_shards(ckpt.job.layout.numel, num_servers, align)
    states = split_optimizer_state(ckpt.job, {"state": ckpt.optimizer_state}, ranges)
    for r, state in zip(ranges, states):
        snap = Snapshot(ckpt.job_id, ckpt.job_spec, r.shard_id, r.start, r.stop, ckpt.version, dict(ckpt.last_step),
                        ckpt.param[r.start:r.stop].clone(), {k: v.clone() for k, v in state.items()},
                        ckpt.hyper_json, ckpt.buffers if r.shard_id == 0 else None)
        CheckpointStore(out_dir / f"shard-{r.shard_id}").write(snap)
    spec = {"job_id": ckpt.job_id, "job_spec": base64.b64encode(ckpt.job_spec).decode(), "version": ckpt.version,
            "from": str(ckpt.source)}
    path = out_dir / RESUME_FILE
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path
