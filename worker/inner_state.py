"""Each DiLoCo worker's own inner optimizer state in a trainer's checkpoint (Lightning, HF Trainer).

A trainer's checkpoint is written by rank 0 and holds rank 0's optimizer state. In DiLoCo mode each
worker's inner optimizer has a state of its own (its moments follow its own part of the data), so
every other worker writes its state beside rank 0's file, one file each: no network, one disk write
per worker, as the HF Trainer's per-process RNG files (the workers need the folder rank 0 writes to:
on one machine or a shared file system). A resumed worker of rank r loads rank r's file, so the
resumed run goes on as the uninterrupted one (ranks are the data's partition, which the state
follows). A worker with no file there (more workers than at the save, or a machine that cannot see
the files) takes rank 0's state, and says so in the log.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("shardps.worker")


def inner_state_path(checkpoint: str | os.PathLike, rank: int, folder: bool = False) -> Path:
    """Where rank ``rank`` keeps its inner state for ``checkpoint``: beside the file (Lightning,
    ``<ckpt>.rank<r>.inner.pt``) or in the folder (``folder``: HF, ``inner_optimizer_rank<r>.pt``)."""
    if folder:
        return Path(checkpoint) / f"inner_optimizer_rank{rank}.pt"
    return Path(f"{os.fspath(checkpoint)}.rank{rank}.inner.pt")


def save_inner_state(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` whole or not at all (a crash mid-write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_inner_state(path: Path, rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s inner state at ``path``, or None (logged: the worker goes on with rank 0's)."""
    if not path.is_file():
        log.warning("no inner optimizer state of rank %d at %s (more workers than when it was saved, or another "
                    "machine's files): this worker resumes with rank 0's", rank, path)
        return None
    return torch.load(path, weights_only=True)
