"""One training process of ``bench/network.py``, run inside a host's network namespace.

    python bench/netpeer.py CONFIG_JSON RANK LOG_JSONL

CONFIG_JSON carries the contender (``kind``: "shardps", "diloco" or "ddp", and its options), the workload,
world size, batch, steps and eval cadence. The process trains ``steps`` steps on its own rows of
each global batch (``Workload.rows``: the same data every contender sees) and appends one JSON
line per step to LOG_JSONL: ``{"step", "step_s", "loss"}``; rank 0 also evaluates the held-out
loss every ``eval_every`` steps and appends ``{"eval": loss, "step", "train_s"}``, where
``train_s`` is the training time so far with its own evaluations left out. A DiLoCo worker's step is
an inner step (the outer step's push and pull count in the step that ends a round); its model is the
job's only right after an outer step, so rank 0 evaluates then (every ``sync_every`` steps) and at the end. At the end it waits
for every process to end its loop (a ``.done`` file each) before leaving. A line is flushed as
soon as it is written, so whoever kills this process at a time limit still reads every finished step.

Blocks while peers are missing (DDP's rendezvous, shardps' ``min_workers``) up to the
connect timeouts of each; exits non-zero with the traceback on stderr when anything fails.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def _bf16_hook(process_group, bucket):
    """torch's bf16_compress_hook, under another name: DDP refuses that name unless it finds CUDA and
    NCCL (a check by ``hook.__name__``), though gloo all-reduces bfloat16 on CPU. Same code path."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)


# DDP checks the hook's annotations as objects (this module's would be strings).
_bf16_hook.__annotations__ = {"bucket": torch.distributed.GradBucket, "return": torch.futures.Future[torch.Tensor]}


def _ddp(model, cfg, rank):
    """Join the gloo group at worker-0's address, wrap ``model`` in DDP with the contender's hook."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    os.environ["GLOO_SOCKET_IFNAME"] = "eth0"  # the host's link, not loopback
    dist.init_process_group("gloo", init_method=f"tcp://{cfg['master']}", rank=rank, world_size=cfg["world"],
                            timeout=timedelta(seconds=cfg["connect_timeout_s"]))
    hook = cfg.get("hook", "")
    # PowerSGD on gloo needs one bucket: with DDP's default two or more, the all-reduces its hook
    # chains from future callbacks are issued in a different order on each rank, and gloo fails
    # ("Received data size doesn't match expected size", reproduced on loopback with charlm). One
    # bucket keeps them in order, at the cost of DDP's overlap of communication with backward.
    buckets = {"bucket_cap_mb": 4096} if hook.startswith("powersgd") else {}
    ddp = torch.nn.parallel.DistributedDataParallel(model, **buckets)
    if hook == "bf16":
        ddp.register_comm_hook(None, _bf16_hook)
    elif hook.startswith("powersgd"):
        # start_powerSGD_iter=2: compress from the second step on (the default, 1000, would run plain
        # all-reduce for the whole benchmark); error feedback and warm start as torch's defaults.
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=int(hook[len("powersgd"):] or 2),
                                            start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif hook:
        raise ValueError(f"unknown DDP hook {hook!r}: use '', 'bf16' or 'powersgd<rank>'")
    return ddp, _OPTIMIZERS[cfg["optimizer"]](ddp.parameters(), lr=cfg["lr"]), rank, dist.destroy_process_group


def _shardps(model, cfg, rank):
    from shardps import ShardedOptimizer

    if "link_parts" in cfg:  # (1: push whole where the shards cut pushes into parts)
        os.environ["SHARDPS_LINK_PARTS"] = str(cfg["link_parts"])

    opt = ShardedOptimizer(model, cluster=cfg["cluster"], optimizer=cfg["optimizer"], lr=cfg["lr"],
                           job=cfg["job"], min_workers=cfg["world"], wire_dtype=cfg.get("wire_dtype", "float32"),
                           pull_dtype=cfg.get("pull_dtype", "float32"),
                           backup_workers=cfg.get("backup_workers", 0), transport=cfg.get("transport", "tcp"),
                           connect_timeout=cfg["connect_timeout_s"], name=f"worker-{rank}")
    return model, opt, opt.rank, opt.close


def _diloco(model, cfg, rank):
    from shardps import DiLoCo
    from shardps.worker.diloco import DILOCO_OUTER

    inner = _OPTIMIZERS[cfg["optimizer"]](model.parameters(), lr=cfg["lr"])
    opt = DiLoCo(model, inner, cfg["cluster"], sync_every=cfg["sync_every"], fragments=cfg.get("fragments", 1),
                 job=cfg["job"], min_workers=cfg["world"], mode=cfg.get("mode", "sync"),
                 outer_lr=cfg.get("outer_lr", DILOCO_OUTER["lr"]), batch_size=cfg["batch"],
                 wire_dtype=cfg.get("wire_dtype", "float32"), transport=cfg.get("transport", "grpc"),
                 connect_timeout=cfg["connect_timeout_s"], name=f"worker-{rank}")
    return model, opt, opt.rank, opt.close


def main(config_json: str, rank: int, log_path: str) -> None:
    from shardps.worker.workloads import get_workload

    cfg = json.loads(config_json)
    torch.set_num_threads(cfg.get("threads", 1))
    wl = get_workload(cfg["workload"])
    model = wl.model()
    module, opt, rank, close = {"ddp": _ddp, "shardps": _shardps, "diloco": _diloco}[cfg["kind"]](model, cfg, rank)
    # DiLoCo: rank 0's model is the job's only right after an outer step: evaluate there, every sync_every
    # steps (so give it --steps a multiple of sync_every for an evaluation at the end). With fragments no
    # step leaves the whole model synced: that is rank 0's model with fragment 0 just synced.
    due = ((lambda: taken() % cfg["sync_every"] == 0) if cfg["kind"] == "diloco"
           else (lambda: taken() >= next_eval or taken() >= cfg["steps"]))
    b, world, every = cfg["batch"], cfg["world"], cfg["eval_every"]
    done = 0  # steps this process took part in
    # The shards number shardps' steps: a worker whose late push was dropped (a backup worker's
    # job) jumps to the open step, skipping the batches it missed, as worker/train.py does.
    taken = (lambda: done) if cfg["kind"] == "ddp" else (lambda: opt.steps_taken)
    train_s, next_eval = 0.0, every
    with open(log_path, "a", buffering=1) as log:
        while (step := taken()) < cfg["steps"]:
            x, y = wl.rows(step, b * world, rank * b, (rank + 1) * b)
            t = time.perf_counter()
            loss = wl.loss(module, x, y)
            opt.zero_grad()
            loss.backward()
            if cfg["kind"] == "ddp":
                opt.step()
            else:
                opt.step(batch_size=b)
            dt = time.perf_counter() - t
            train_s, done = train_s + dt, done + 1
            log.write(json.dumps({"step": step, "step_s": dt, "loss": loss.item()}) + "\n")
            if rank == 0 and due():
                while next_eval <= taken():
                    next_eval += every
                log.write(json.dumps({"eval": wl.evaluate(model)["loss"], "step": step, "train_s": train_s}) + "\n")
    _finish_together(log_path, cfg)
    close()


def _finish_together(log_path: str, cfg: dict) -> None:
    """Stay in the job until every process ended its loop (a ``.done`` file beside each log; they share a
    file system): a fast worker leaving early would leave a backup worker's slow one unable to close its
    last step (the job falls below min_workers). Waits at most ``connect_timeout_s``."""
    from pathlib import Path

    mine = Path(log_path)
    mine.with_suffix(".done").touch()
    others = [Path(p).with_suffix(".done") for p in cfg["logs"]]
    deadline = time.monotonic() + cfg["connect_timeout_s"]
    while not all(p.exists() for p in others) and time.monotonic() < deadline:
        time.sleep(0.1)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: netpeer.py CONFIG_JSON RANK LOG_JSONL (bench/network.py starts it)")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
