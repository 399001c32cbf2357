"""ShardedOptimizer: a torch.optim.Optimizer whose state and update live on the shard servers.

A training loop changes in one line:

    opt = ShardedOptimizer(model, cluster="127.0.0.1:7070", optimizer="adamw",
                           lr=1e-3, weight_decay=0.01, mode="sync", min_workers=2)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward()
        opt.step(batch_size=len(x))   # push grads to every shard, pull the new slices
    opt.close()

Construction registers with the coordinator (the first worker defines the job and
uploads its parameters; everyone then starts from them, as DDP starts from rank 0),
then blocks until ``min_workers`` workers have registered. ``rank``/``world_size``
pick the data shard. ``step`` blocks until the shards answer (sync: until every
worker pushed the step). It is an ``Optimizer`` subclass, so torch's LR schedulers
work: the worker's ``param_groups[0]["lr"]`` travels with every push.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from typing import Any, Iterable

import torch

from ..coordinator.client import CoordinatorClient
from ..proto import optim
from ..proto.assemble import optimizer_state_dict
from ..proto.codec import DEFAULT_CHUNK_BYTES, dtype_from_name
from ..proto.gen import shardps_pb2 as pb
from ..proto.messages import JobConfig, UpdateMode
from ..proto.errors import RolledBack, UnknownWorker
from ..proto.retry import Retrier
from ..proto.security import Security
from .compress import TopK
from .flat import FlatParams
from .overlap import OverlapPusher
from .ps_client import PSClient, PushReply

WIRE_DTYPES = ("float32", "bfloat16", "float16")


class ShardedOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.nn.Parameter],
        cluster: str | None = None,
        optimizer: str = "sgd",
        *,
        mode: str = "sync",
        min_workers: int | None = None,
        backup_workers: int = 0,
        staleness: int = 0,
        staleness_lr: bool = False,
        topk_ratio: float = 0.0,
        balance_every: int = 0,
        wire_dtype: str = "float32",
        overlap: bool = False,
        name: str = "",
        connect_timeout: float = 120.0,
        step_timeout: float = 330.0,
        retry_timeout: float = 600.0,
        auth_token: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **optimizer_kwargs: Any,
    ):
        """
        Args:
            model: an ``nn.Module`` (parameter names come from ``named_parameters()``) or an
                iterable of parameters (named "0", "1", ... in order).
            cluster: the coordinator's ``host:port`` (default: ``SHARDPS_CLUSTER``, which
                ``shardps launch`` sets for the scripts it starts).
            optimizer: torch's lower-case optimizer name: "sgd", "adam" or "adamw".
            mode: "sync" (one update per step, sample-weighted mean of every worker's
                gradient), "ssp" (sync steps, but a worker may run up to ``staleness``
                steps ahead of the last closed step) or "async" (each push applied on arrival).
            min_workers: training starts once this many workers have registered (default:
                ``SHARDPS_MIN_WORKERS``, which ``shardps launch --nproc N`` sets to N; else 1).
            staleness: ssp only: the bound k (0 behaves exactly as sync).
            backup_workers: sync/ssp: close each step after the first (workers - b) pushes;
                a late worker's push is dropped (counted, never applied) and it carries on
                from the fresh parameters.
            staleness_lr: async: each push is applied with lr / max(1, staleness); ssp: each step
                with lr / max(1, mean staleness of its pushes).
            topk_ratio: send only this fraction of each shard's gradient elements (largest
                magnitude first); the rest is kept on this worker and added to the next
                step's gradient (error feedback). 0 sends everything.
            balance_every: sync/ssp: every this many steps the coordinator re-splits each
                global batch between the workers by their measured throughput (see
                ``worker.balance.BatchSplit``, which asks for this worker's rows). 0: equal.
            wire_dtype: dtype of pushed gradients: "float32", "bfloat16" or "float16"
                (servers keep fp32 masters either way).
            overlap: push each shard's gradients as soon as backward has produced them,
                hiding communication behind the rest of backward. Wrap gradient-accumulation
                micro-batches in ``opt.no_sync()``.
            name: how this worker appears in status (default ``SHARDPS_WORKER_NAME``, else host:pid).
            connect_timeout: seconds to wait for the cluster and for min_workers.
            step_timeout: deadline of one push-pull attempt, seconds (sync waits for the slowest worker).
            auth_token: the cluster's shared token (default: SHARDPS_AUTH_TOKEN); TLS settings come
                from SHARDPS_TLS_CA (and SHARDPS_TLS_CERT/KEY for mutual TLS).
            retry_timeout: how long a push or pull keeps retrying transient failures (server
                restarting or paused, reply lost) before it raises; retries are exactly-once.
            chunk_bytes: bytes per streamed chunk.
            **optimizer_kwargs: the torch.optim class's own arguments (lr, momentum, betas, ...).
        """
        cluster = cluster or os.environ.get("SHARDPS_CLUSTER", "")
        if not cluster:
            raise ValueError("no cluster address: pass cluster='HOST:PORT' or set SHARDPS_CLUSTER "
                             "(shardps launch sets it)")
        if min_workers is None:
            min_workers = int(os.environ.get("SHARDPS_MIN_WORKERS", "1"))
        name = name or os.environ.get("SHARDPS_WORKER_NAME", "")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        named = list(model.named_parameters() if isinstance(model, torch.nn.Module)
                     else ((str(i), p) for i, p in enumerate(model)))
        kwargs = optim.normalize_kwargs(optimizer, optimizer_kwargs)
        self._wire_dtype = dtype_from_name(wire_dtype)
        # Top-k reads the fp32 gradients and casts only what it sends, so it needs no wire copy.
        self.flat = FlatParams(named, torch.float32 if 0 < topk_ratio < 1 else self._wire_dtype)
        self.job = JobConfig(self.flat.layout, optimizer, kwargs, UpdateMode.parse(mode), min_workers,
                             backup_workers, staleness_lr, staleness, topk_ratio, balance_every)
        super().__init__(self.flat.params, dict(kwargs))
        self.step_timeout = step_timeout
        self.retry = Retrier(budget=retry_timeout)
        self.security = Security.from_env(token=auth_token)
        self.device = str(self.flat.params[0].device)
        self._overlap = None
        self._connect(cluster, name or f"{socket.gethostname()}:{os.getpid()}", connect_timeout, chunk_bytes, overlap)

    def _connect(self, cluster: str, name: str, timeout: float, chunk_bytes: int, overlap: bool) -> None:
        self.coordinator = CoordinatorClient(cluster, security=self.security)
        reg = self.coordinator.register_worker(self.job, name, self.device, wait=timeout)
        self.job_id, self.worker_id, self.plan = reg.job_id, reg.worker_id, reg.plan
        self.rollbacks = 0  # times the job rolled back under this worker (a shard restarted)
        self.last_replies: list[PushReply] = []
        self._evicted = ""
        self._view_changed = threading.Event()
        self._heartbeat = _Heartbeat(self)  # the lease runs from registration on
        self.compressor = (TopK(self.job.layout.numel, self.job.topk_ratio, self._wire_dtype)
                           if self.job.sparse_push else None)
        self.ps = PSClient(reg.plan, reg.job_id, self.job.layout.fingerprint, chunk_bytes, self.step_timeout,
                           self.compressor, self.retry, self.worker_id, self.security)
        if reg.initializer:
            self.ps.init(self.flat.gather_params(), self.worker_id)
        view = self.coordinator.wait_for_view(self.job_id, self.worker_id, timeout)
        self._adopt(view)
        # A worker joining a running sync job starts at the first step of the first view it is
        # in, with the parameters after the step before it.
        start = self.coordinator.first_view_with(self.job_id, self.worker_id, view).start_step
        min_version = start if self.job.mode is not UpdateMode.ASYNC else 0
        self.versions = self.ps.pull(self.flat.values, min_version)
        self.flat.scatter_params()
        self.steps_taken = start  # the step this worker pushes next
        if overlap:
            self._overlap = OverlapPusher(self.flat, self.ps, self.step_timeout)
            self._overlap.arm(self._header(0, 0.0), self.versions)

    def pull(self) -> list[int]:
        """Load the shards' current parameters into the model; return each shard's version."""
        self.versions = self.ps.pull(self.flat.values)
        self.flat.scatter_params()
        return self.versions

    @torch.no_grad()
    def step(self, closure=None, *, batch_size: int = 1):
        """Push every gradient slice to its shard (all at once), then load the returned slices.

        ``batch_size`` weighs this worker's gradient in the sync mean; pass the number
        of samples behind it (default 1: equal weights). Blocks until the shards reply.
        """
        if self._evicted:
            raise UnknownWorker(self._evicted)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = float(self.param_groups[0]["lr"])
        try:
            if self._overlap is not None:
                replies = self._overlap.finish(int(batch_size), lr)
            else:
                header = self._header(int(batch_size), lr)
                replies = self.ps.push_pull(self.flat.gather_grads(), self.flat.values, header, self.versions)
        except RolledBack as exc:
            self._rejoin(exc)
            return loss
        self.flat.scatter_params()
        self.versions = [r.version for r in replies]
        self.last_replies = replies
        if max(r.epoch for r in replies) > self.epoch or self._view_changed.is_set():
            self._refresh_view()  # before the next step picks its data by rank
        # The shards say which step comes next: +1 normally; in sync mode with backup
        # workers a late worker whose push was dropped jumps to the open step.
        self.steps_taken = min(r.next_step for r in replies)
        if self._overlap is not None:
            self._overlap.arm(self._header(0, 0.0), self.versions)
        return loss

    def _adopt(self, view) -> None:
        if self.worker_id not in view.worker_ids:
            self._evicted = (f"worker {self.worker_id} is not in the job's membership (epoch {view.epoch}): its "
                             "lease ran out; register again (a new ShardedOptimizer) to rejoin")
            raise UnknownWorker(self._evicted)
        self.epoch = view.epoch
        self.rank = next(m.rank for m in view.members if m.worker_id == self.worker_id)
        self.world_size = len(view.members)

    def _refresh_view(self) -> None:
        """The membership changed: take this worker's new rank and the new world size."""
        self._view_changed.clear()
        self._adopt(self.coordinator.view(self.job_id, 0))

    def counters(self) -> dict[str, int]:
        """This worker's fault counters (also reported to the coordinator with every heartbeat)."""
        stats = self.retry.stats.as_dict()
        return {"retries": stats["retries"], "timeouts": stats["timeouts"], "gave_up": stats["gave_up"],
                "rollbacks": self.rollbacks}

    def _rejoin(self, rollback: RolledBack) -> None:
        """A shard restarted and the job rolled back to an earlier step: this step's gradient is
        void. Wait for the rollback's membership epoch, pull the parameters of that step and go on
        from it: ``steps_taken`` moves back, so a loop that picks its data by ``steps_taken``
        replays exactly the steps that were undone."""
        view = self.coordinator.wait_for_epoch(self.job_id, rollback.epoch, self.step_timeout)
        self._adopt(view)
        self.pull()
        self.steps_taken = view.start_step
        self.rollbacks += 1
        self.last_replies = []
        if self._overlap is not None:
            self._overlap.arm(self._header(0, 0.0), self.versions)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. For fp32 CPU models they are views into the push buffer and are
        zeroed in place whatever ``set_to_none`` says (as DDP's gradient_as_bucket_view)."""
        if self.flat.bound:
            self.flat.zero_grads()
        else:
            super().zero_grad(set_to_none)

    def _header(self, batch_size: int, lr: float) -> pb.PushHeader:
        return pb.PushHeader(worker_id=self.worker_id, step=self.steps_taken, epoch=self.epoch,
                             batch_size=batch_size, lr=lr)

    def no_sync(self):
        """Context manager for gradient-accumulation micro-batches (as DDP's): with ``overlap=True``,
        backward inside it pushes nothing; the next backward outside it pushes the sum."""
        return self._overlap.no_sync() if self._overlap is not None else contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state gathered from every shard, in ``torch.optim``'s format.

        ``{"state": {i: {"exp_avg": ..., "step": ...}}, "param_groups": [{..., "params": [0..n-1]}]}``
        with ``i`` the index of the parameter in layout order, so it loads into a stock
        torch optimizer built over ``model.parameters()``.
        """
        shards = [tensors for _, tensors in self.ps.pull_state()]
        return optimizer_state_dict(self.job.layout, shards, self.param_groups[0])

    def load_state_dict(self, state_dict):
        raise RuntimeError(
            "a ShardedOptimizer's state lives on the shard servers, which own it for the whole job; "
            "load this state_dict into a plain torch optimizer instead"
        )

    def close(self) -> None:
        """Leave the job and close every channel. Safe to call twice."""
        if getattr(self, "ps", None) is None:
            return
        if self._overlap is not None:
            self._overlap.close()
        self._heartbeat.stop()
        try:
            self.coordinator.leave(self.job_id, self.worker_id)
        finally:
            self.ps.close()
            self.coordinator.close()
            self.ps = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



class _Heartbeat:
    """Renews the worker's lease every lease / 3 seconds on a daemon thread, reporting its step
    and fault counters; notes a newer membership epoch and an eviction for the training thread."""

    def __init__(self, opt: ShardedOptimizer):
        self.opt, self._stop = opt, threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardps-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = 0.0  # the first heartbeat at once
        while not self._stop.wait(interval):
            opt = self.opt
            try:
                epoch, lease = opt.coordinator.heartbeat(opt.job_id, opt.worker_id,
                                                           getattr(opt, "steps_taken", 0), opt.counters())
            except UnknownWorker as exc:
                opt._evicted = str(exc)
                return
            except Exception as exc:  # coordinator unreachable for a moment: the lease has slack
                logging.getLogger("shardps.worker").warning("heartbeat failed: %s", exc)
                interval = 0.5
                continue
            interval = max(0.05, lease / 3)
            if epoch > getattr(opt, "epoch", epoch):
                opt._view_changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
