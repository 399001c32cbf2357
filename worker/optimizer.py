"""ShardedOptimizer: a torch.optim.Optimizer whose state and update live on the shard servers.

A training loop changes in one line:

    opt = ShardedOptimizer(model, cluster="127.0.0.1:7070", optimizer="adamw",
                           lr=1e-3, weight_decay=0.01, mode="sync", min_workers=2)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward()
        opt.clip_grad_norm_(1.0)      # optional: clips the averaged gradient, returns its norm
        opt.step()                    # push grads to every shard, pull the new slices
    opt.close()

It takes what ``torch.optim`` takes (a module, parameters, (name, parameter) pairs or
param-group dicts), keeps torch's semantics group by group (every scheduled
hyper-parameter travels with each push; a parameter without a gradient is skipped),
saves and loads torch's ``state_dict`` format both ways, keeps the model's buffers
as DDP does (rank 0's, broadcast every step), and works under an fp16 ``GradScaler``
(an overflow on any worker skips the step on every worker). Where DDP and
single-process torch differ, it follows DDP: ``step()`` without ``batch_size``
averages the workers' gradients with equal weights; pass ``batch_size=n`` for the
sample-weighted mean (then sync training equals one process on the union batch).

Construction registers with the coordinator (the first worker defines the job and
uploads its parameters; everyone then starts from them, as DDP starts from rank 0),
then blocks until ``min_workers`` workers have registered. ``rank``/``world_size``
pick the data shard. ``step`` blocks until the shards answer (sync: until every
worker pushed the step).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import warnings
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..coordinator.client import CoordinatorClient
from ..proto import buffers as buffer_file
from ..proto import optim
from ..proto.assemble import merge_state, model_state_dict, optimizer_state_dict, split_optimizer_state
from ..proto.codec import DEFAULT_CHUNK_BYTES, dtype_from_name, wire_dtype as dtype_on_wire
from ..proto import defaults as D
from ..proto.defaults import PUSH_TIMEOUT_S
from ..proto.errors import FailedPrecondition, MembershipChanged, RolledBack, UnknownWorker
from ..proto.gen import shardps_pb2 as pb
from ..runtime.history import ENV as HISTORY_ENV
from ..runtime.history import History
from ..proto.layout import BufferEntry
from ..proto.messages import DEFAULT_JOB, JobConfig, UpdateMode
from ..runtime.retry import Retrier
from ..runtime.security import Security
from . import param_groups as added_groups
from . import torch_compat
from .collectives import Collectives
from .compress import Int8, TopK
from .flat import FlatParams
from .heartbeat import Heartbeat
from .overlap import OverlapPusher
from .ps_client import ClipExchange, Locator, PSClient, PushReply, results

log = logging.getLogger("shardps.worker")

WIRE_DTYPES = ("float32", "bfloat16", "float16", "int8")
PULL_DTYPES = ("float32", "bfloat16", "float16")  # a step's reply: see ``pull_dtype``
TRANSPORTS = ("auto", "tcp", "grpc")  # see ``transport`` in ShardedOptimizer's docstring
RECONNECT_S = 60.0  # how long coordinator calls ride out a restarting coordinator


@dataclass
class _Step:
    """This step's pushes in flight (started by ``clip_grad_norm_``, the overlap hooks or ``step``)."""

    futures: list[Future]
    exchange: ClipExchange | None
    batch_size: int
    clipped: bool


class ShardedOptimizer(torch.optim.Optimizer):
    _step_supports_amp_scaling = True  # GradScaler calls step() with found_inf/grad_scale set (see torch_compat)
    _moves_between_steps = False  # DiLoCo (worker/diloco.py): inner steps move the model between two steps

    def __init__(
        self,
        params: torch.nn.Module | Iterable,
        cluster: str | None = None,
        optimizer: str | type = "sgd",
        *,
        model: torch.nn.Module | None = None,
        job: str = DEFAULT_JOB,
        mode: str = "sync",
        min_workers: int | None = None,
        backup_workers: int = 0,
        staleness: int = 0,
        staleness_lr: bool = False,
        topk_ratio: float = 0.0,
        balance_every: int = 0,
        replicas: int = 1,
        wire_dtype: str = "float32",
        pull_dtype: str = "float32",
        overlap: bool = False,
        broadcast_buffers: bool = True,
        transport: str = "",
        name: str = "",
        connect_timeout: float = 120.0,
        step_timeout: float = PUSH_TIMEOUT_S,
        retry_timeout: float = 600.0,
        auth_token: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        history_dir: str | None = None,
        first_step: int = 0,
        **optimizer_kwargs: Any,
    ):
        """
        Args:
            params: what torch.optim takes: an ``nn.Module`` (its parameters, named), an iterable of
                parameters or of (name, parameter) pairs, or a list of param-group dicts with their
                own hyper-parameters (nanoGPT's and HF's decay / no-decay groups).
            cluster: the coordinator's ``host:port`` (default: ``SHARDPS_CLUSTER``, which
                ``shardps launch`` sets for the scripts it starts).
            optimizer: torch's class or its lower-case name: "sgd", "adam", "adamw", "adagrad",
                "rmsprop", "adamax", "nadam", "radam", "adadelta", "asgd", "rprop".
            model: the module the parameters belong to, when ``params`` is not the module itself:
                names the parameters (and their tied aliases) and brings its buffers into the job.
            job: the job's name in the cluster; a GAN's generator and discriminator optimizers are
                two jobs on one cluster.
            mode: "sync" (one update per step, mean of every worker's gradient), "ssp" (sync steps,
                but a worker may run up to ``staleness`` steps ahead of the last closed step) or
                "async" (each push applied on arrival).
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
            replicas: copies of each shard, each on its own server (at most the number of servers).
                With 2 or more, a killed server's shards fail over to an in-sync copy and nothing
                rolls back; 1 (default): a lost server costs a rollback to the last checkpoint.
            wire_dtype: dtype of pushed gradients: "float32", "bfloat16", "float16" or "int8" (a
                quarter of fp32's bytes: one fp32 scale per 4096 elements, the rounding error kept on
                this worker and added to the next step's gradient; over gRPC only, not with
                ``topk_ratio``). Servers keep fp32 masters either way.
            pull_dtype: dtype of the parameters each step's reply brings back over the network:
                "float32" (exact), "bfloat16" or "float16" (half the bytes: the model then holds the
                shards' fp32 values rounded to it, as autocast's low-precision copies do; the shards
                keep and apply to the exact fp32 values, which checkpoints and exports save). Replies
                through shared memory stay fp32; pulls (start, rejoin, rollback) are always exact.
            overlap: push each shard's gradients as soon as backward has produced them,
                hiding communication behind the rest of backward. Wrap gradient-accumulation
                micro-batches in ``opt.no_sync()``.
            broadcast_buffers: as DDP's: every worker takes rank 0's buffers after each step
                (False: each keeps its own; the job still keeps rank 0's for exports).
            transport: how gradients and parameters travel to each shard: "auto" (default, or
                ``SHARDPS_TRANSPORT``): through shared memory with servers on this host, on the
                server's byte link (raw TCP beside gRPC) with the others, over gRPC where neither
                works (tried per shard, so it falls back by itself); "tcp": the byte link even on
                this host; "grpc": always inside gRPC.
            name: how this worker appears in status (default ``SHARDPS_WORKER_NAME``, else host:pid).
            connect_timeout: seconds to wait for the cluster and for min_workers.
            step_timeout: deadline of one push-pull attempt, seconds (sync waits for the slowest worker).
            retry_timeout: how long a push or pull keeps retrying transient failures (server
                restarting or paused, reply lost) before it raises; retries are exactly-once.
            auth_token: the cluster's shared token (default: SHARDPS_AUTH_TOKEN); TLS settings come
                from SHARDPS_TLS_CA (and SHARDPS_TLS_CERT/KEY for mutual TLS).
            chunk_bytes: bytes per streamed chunk.
            history_dir: append every reply this worker takes to the run's history here (``shardps
                check``; default ``SHARDPS_HISTORY_DIR``, which ``shardps run`` sets; "" records none).
            first_step: the step number of the job's first update (its shards start at that version):
                ``add_param_group`` builds an added group's job with its parent's step then, so that the
                two count steps alike (their checkpoints and rollbacks line up). Leave it 0.
            **optimizer_kwargs: the torch.optim class's own arguments (lr, momentum, betas, ...);
                ``fused``/``foreach``/``capturable`` are accepted and left to the servers.
        """
        cluster = cluster or os.environ.get("SHARDPS_CLUSTER", "")
        if not cluster:
            raise ValueError("no cluster address: pass cluster='HOST:PORT' or set SHARDPS_CLUSTER "
                             "(shardps launch sets it)")
        if min_workers is None:
            min_workers = int(os.environ.get("SHARDPS_MIN_WORKERS", "1"))
        name = name or os.environ.get("SHARDPS_WORKER_NAME", "")
        self.history = History.open(os.environ.get(HISTORY_ENV, "") if history_dir is None else history_dir, "worker")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        if pull_dtype not in PULL_DTYPES:
            raise ValueError(f"pull_dtype must be one of {PULL_DTYPES}, got {pull_dtype!r}")
        # PushHeader.reply_dtype (0, unspecified: float32)
        self._reply_dtype = 0 if pull_dtype == "float32" else dtype_on_wire(dtype_from_name(pull_dtype))
        transport = transport or os.environ.get("SHARDPS_TRANSPORT", "auto")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        module = params if isinstance(params, torch.nn.Module) else model
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        optimizer = optim.name_of(optimizer)
        defaults = optim.full_defaults(optimizer, optimizer_kwargs)
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        named = torch_compat.describe_params(self.param_groups, module)
        self._wire_dtype = dtype_from_name(wire_dtype)
        # Top-k and int8 read the fp32 gradients and encode only what they send, so they need no wire copy.
        sparse = 0 < topk_ratio < 1
        if sparse and self._wire_dtype is torch.int8:
            raise ValueError("wire_dtype='int8' sends every element; with topk_ratio use float32, bfloat16 or "
                             "float16 for the chosen ones")
        compressed = sparse or self._wire_dtype is torch.int8
        self.flat = FlatParams(*named, len(self.param_groups), torch.float32 if compressed else self._wire_dtype,
                               shared=transport == "auto" and not compressed)
        try:
            self._buffers = torch_compat.persistent_buffers(module)
            self.job = JobConfig(
                self.flat.layout, optimizer, defaults, UpdateMode.parse(mode), min_workers, backup_workers, staleness_lr,
                staleness, topk_ratio, balance_every,
                groups=tuple(optim.group_kwargs(optimizer, defaults, g) for g in self.param_groups),
                buffers=tuple(BufferEntry(n, tuple(b.shape), str(b.dtype).removeprefix("torch."))
                              for n, b in self._buffers.items()),
                broadcast_buffers=broadcast_buffers, name=job, replicas=replicas, first_step=first_step)
            self._state_keys = list(module.state_dict(keep_vars=True)) if module is not None else []
            self._module, self._own_groups = module, len(self.param_groups)
            self.extensions: list[ShardedOptimizer] = []  # param groups added later (worker.param_groups)
            # What an added group's job is built with: this one's settings (its min_workers: the world size then).
            self._extend_args: dict[str, Any] = dict(
                cluster=cluster, mode=mode, backup_workers=backup_workers, staleness=staleness,
                staleness_lr=staleness_lr, topk_ratio=topk_ratio, replicas=replicas, wire_dtype=wire_dtype,
                pull_dtype=pull_dtype, transport=transport, name=name, connect_timeout=connect_timeout, step_timeout=step_timeout,
                retry_timeout=retry_timeout, auth_token=auth_token, chunk_bytes=chunk_bytes, history_dir=history_dir)
            self._param_ids = {id(p) for p in self.flat.params}
            self._warned_local_clip = self._warned_edit = False
            self.step_timeout = step_timeout
            # Replicated shards move when a server dies: retry often enough to follow them within a lease.
            self.retry = Retrier(budget=retry_timeout, maximum=0.5 if replicas > 1 else 2.0)
            self.security = Security.from_env(token=auth_token)
            self.device = str(self.flat.params[0].device)
            self._overlap: OverlapPusher | None = None
            self._inflight: _Step | None = None
            self._connect(cluster, name or f"{socket.gethostname()}:{os.getpid()}", connect_timeout, chunk_bytes, overlap)
        except BaseException:
            self._abandon()  # a refused registration leaves no shared memory, lease or channel behind
            raise
        torch_compat.track(self)

    def _abandon(self) -> None:
        """Undo a construction that failed part way: whatever exists of it is closed, a registered
        worker leaves (best effort: the error that got us here is the one to report)."""
        if getattr(self, "_overlap", None) is not None:
            self._overlap.close()
        if getattr(self, "_heartbeat", None) is not None:
            self._heartbeat.stop()
        self.flat.close()
        coordinator, ps = getattr(self, "coordinator", None), getattr(self, "ps", None)
        try:
            if coordinator is not None and getattr(self, "worker_id", None) is not None:
                coordinator.leave(self.job_id, self.worker_id)
        except Exception:  # noqa: BLE001 - the construction error is the one to raise
            pass
        finally:
            for part in (ps, coordinator):
                if part is not None:
                    part.close()
            self.ps = None

    def _connect(self, cluster: str, name: str, timeout: float, chunk_bytes: int, overlap: bool) -> None:
        self.coordinator = CoordinatorClient(cluster, security=self.security, reconnect=RECONNECT_S)
        added_groups.refuse_late_join(self)
        reg = self.coordinator.register_worker(self.job, name, self.device, wait=timeout)
        self.job_id, self.worker_id, self.plan = reg.job_id, reg.worker_id, reg.plan
        self.rollbacks = 0  # times the job rolled back under this worker (a shard restarted)
        self.last_replies: list[PushReply] = []
        self._heartbeat = Heartbeat(self)  # the lease runs from registration on
        self.compressor = (TopK(self.job.layout.numel, self.job.topk_ratio, self._wire_dtype)
                           if self.job.sparse_push else Int8(self.job.layout.numel)
                           if self._wire_dtype is torch.int8 else None)
        locate = (Locator(lambda suspect: self.coordinator.job(job_id=self.job_id, suspect=suspect)[2])
                  if self.job.replicas > 1 else None)
        self.ps = PSClient(reg.plan, reg.job_id, self.job.layout.fingerprint, chunk_bytes, self.step_timeout,
                           self.compressor, self.retry, self.worker_id, self.security, self.flat.segment, locate,
                           links=self.transport in ("auto", "tcp"),
                           parts=self.job.mode is UpdateMode.SYNC and not self.job.staleness_bound
                           and not self.job.backup_workers and self.job.replicas == 1
                           and os.environ.get(D.setting("link_parts").env, "") != "1")
        if reg.initializer:
            self.ps.init(self.flat.gather_params(), self.worker_id, self._buffers_blob())
        view = self.coordinator.wait_for_view(self.job_id, self.worker_id, timeout)
        self._adopt(view)
        if self.job.mode is UpdateMode.ASYNC:  # nobody waits for an async worker: it takes what is there
            self._pull()
            self.steps_taken = self.coordinator.first_view_with(self.job_id, self.worker_id, view).start_step
        else:
            self.steps_taken = self._join(view, timeout)  # the step this worker pushes next
        added_groups.refuse_late_join(self, joined_at=self.steps_taken)
        if overlap:
            self._overlap = OverlapPusher(self.flat, self.ps, self.step_timeout)
            self._overlap.arm(self._header(), self.versions)

    def _join(self, view, timeout: float) -> int:
        """Pull the parameters of the step this worker starts at in a sync job (the parameters after
        the step before it) and return that step. A worker joining a running job starts a few steps
        ahead of the shards, so the pull waits; meanwhile a rollback below that step, or a dead
        worker's removal from the open step, can make it a member from an earlier step, which the
        shards then wait for. They end the pull (RolledBack, MembershipChanged) and it takes the
        newest view and pulls again. Each change brings a newer epoch; waiting for one is bounded
        by ``timeout`` (the connect timeout)."""
        while True:
            start = self.coordinator.join_step(self.job_id, self.worker_id, view)
            try:
                self._pull(start, epoch=view.epoch)
                return start
            except (RolledBack, MembershipChanged) as exc:
                view = self.coordinator.wait_for_epoch(self.job_id, max(exc.epoch, view.epoch + 1), timeout)
                self._adopt(view)

    # ------------------------------------------------------------------ parameters and buffers

    def _pull(self, min_version: int = 0, epoch: int = 0) -> list[int]:
        self._leave_exposed_segment()
        self.flat.quiesce()  # no device copy still reads the host values the pull overwrites
        self.versions, blob = self.ps.pull(self.flat.values, min_version, buffers=bool(self._buffers), epoch=epoch)
        self.flat.scatter_params()
        if blob is not None and self.job.broadcast_buffers:
            torch_compat.load_buffers(self._buffers, buffer_file.decode(blob))
        return self.versions

    def _leave_exposed_segment(self) -> None:
        """Move to a new shared-memory segment if a push through this one was given up before its
        server answered (a paused or partitioned primary, a call cut when its shard moved): that
        server may write its reply in whenever it runs again, over parameters that moved on since.
        Only ``_pull`` calls it: the values copied to the new segment may hold such a write."""
        if not self.flat.exposed:
            return
        log.warning("a push through shared memory %s was given up before its server answered: the model moves "
                    "to a new segment (that server may still write into the old one) and pulls its parameters",
                    self.flat.segment.name)
        self.flat.renew_segment()
        self.ps.use_segment(self.flat.segment)

    def pull(self) -> list[int]:
        """Load the shards' current parameters (and the job's buffers) into the model, added param
        groups' included; return each of this job's shards' version."""
        for ext in self.extensions:
            ext.pull()
        return self._pull()

    def _buffers_blob(self) -> bytes | None:
        return buffer_file.encode(self._buffers) if self._buffers else None

    def upload_params(self) -> None:
        """Make this worker's current parameters (and buffers) the job's, replacing the shards'
        (a deliberate edit between two steps: WGAN weight clipping, ``model.load_state_dict``).
        In sync mode every worker that makes the same edit may call it; the result is the same."""
        self.ps.init(self.flat.gather_params(), self.worker_id, self._buffers_blob(), replace=True)
        self.flat.scatter_params()
        for ext in self.extensions:  # added param groups' parameters are the model's too
            ext.upload_params()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state_dict as the shards hold it (parameters under every tied name, buffers),
        in the model's key order and dtypes: ``model.load_state_dict(sd, strict=True)`` takes it."""
        flat = torch.empty(self.job.layout.numel)
        _, blob = self.ps.pull(flat, buffers=bool(self._buffers))
        sd = model_state_dict(self.job.layout, flat, buffer_file.decode(blob) if blob else {})
        for ext in self.extensions:  # added param groups: their parameters are the model's too
            sd.update(ext.model_state_dict())
        order = [k for k in self._state_keys if k in sd]
        return {k: sd[k] for k in order + [k for k in sd if k not in set(order)]}

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def step(self, closure=None, *, batch_size: int | None = None):
        """Push every gradient slice to its shard (all at once), then load the returned slices.

        ``batch_size`` weighs this worker's gradient in the sync mean; pass the number of
        samples behind it (default: equal weights, as DDP averages). Blocks until the shards
        reply. Under an fp16 ``GradScaler``, an overflow on any worker skips the step everywhere.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_alive()
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step (see torch_compat)
        overflow = bool(found_inf is not None and float(found_inf) > 0)
        grad_scale = getattr(self, "grad_scale", None)
        step = self._inflight
        if step is None:
            step = self._begin(batch_size, overflow=overflow, grad_scale=float(grad_scale or 0.0))
        elif batch_size is not None and batch_size != step.batch_size:
            raise ValueError(f"clip_grad_norm_ pushed this step with batch_size={step.batch_size}; pass that to "
                             f"step() too (or give clip_grad_norm_ batch_size={batch_size})")
        self._inflight = None
        try:
            self._finish(self._await(step.futures), overflow, found_inf is not None)
        except RolledBack as exc:
            self._rejoin(exc)
        self._finish_extensions(overflow, found_inf is not None)
        added_groups.follow_rollbacks(self)
        return loss

    def _finish_extensions(self, overflow: bool, under_scaler: bool) -> None:
        """Wait for the added param groups' pushes of this step (started with this job's) and take their replies."""
        for ext in self.extensions:
            step, ext._inflight = ext._inflight, None
            try:
                ext._finish(ext._await(step.futures), overflow, under_scaler)
            except RolledBack as exc:
                ext._rejoin(exc)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None, *, batch_size: int | None = None) -> torch.Tensor:
        """Clip the step's *averaged* gradient to ``max_norm`` by its norm over every shard, as
        ``torch.nn.utils.clip_grad_norm_`` does on the union batch in one process (FSDP's
        ``clip_grad_norm_``), and return that total norm. Call it after backward and before
        ``step()``; it starts the step's push (``batch_size`` as for ``step``; the step's
        hyper-parameters are read now). Under a GradScaler call ``scaler.unscale_(opt)`` first,
        as torch requires. ``foreach`` is accepted for torch's signature; the shards decide.
        """
        self._check_alive()
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not (max_norm > 0 and math.isfinite(max_norm)) or not norm_type > 0:
            raise ValueError(f"max_norm must be a finite number > 0 and norm_type > 0, got {max_norm}, {norm_type}")
        if self._inflight is not None and self._inflight.clipped:
            raise RuntimeError("clip_grad_norm_ was already called for this step; call step() next")
        device = self.flat.params[0].device
        if not all(f.all_finite() for f in self._flats()):
            # The averaged gradient is not finite either; push nothing yet: step() sends an overflow
            # vote under a GradScaler (the step is skipped everywhere), else the shards refuse it.
            total = torch.nn.utils.get_total_norm([p.grad for p in self._params() if p.grad is not None],
                                                  norm_type, error_if_nonfinite)
            return total.to(device)
        step = self._begin(batch_size, clip=(max_norm, norm_type))
        total = step.exchange.wait(self._check_progress)
        if total is None:  # no total came: the step was skipped (an overflow elsewhere) or our push dropped
            wait_for = self._await(step.futures)
            total = math.inf if any(r.skipped for r in wait_for) else self._local_norm(norm_type)
        if error_if_nonfinite and not math.isfinite(total):
            raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is "
                               "non-finite, so it cannot be clipped. To disable this error and scale the "
                               "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        return torch.tensor(total, dtype=torch.float32, device=device)

    def _await(self, futures: list[Future]) -> list[PushReply]:
        """The replies of this step's pushes; raises at once if the job can never close the step
        (the other workers left it), instead of waiting for the step's timeout."""
        while True:
            done, _ = wait(futures, timeout=0.5)
            if len(done) == len(futures):
                return results(futures)
            self._check_progress()

    def _flats(self) -> list[FlatParams]:
        return [self.flat, *(ext.flat for ext in self.extensions)]

    def _params(self) -> list[torch.Tensor]:
        return [p for f in self._flats() for p in f.params]

    def _check_progress(self) -> None:
        added_groups.refuse_if_waited_for(self)
        if self._heartbeat.abandoned and self._heartbeat.waiting_for and not self._step_closed():
            reason = f"step {self.steps_taken} of job {self.job.name!r} cannot close: {self._heartbeat.waiting_for}"
            self.ps.abort(reason)  # nothing in flight keeps retrying (nor keeps the process from exiting)
            raise FailedPrecondition(reason)
        self._check_alive()

    def _step_closed(self) -> bool:
        """Whether the step this worker is waiting on may have closed on every shard: none says its
        version is still the one this worker's last reply had. In a sync job no step closes without this
        worker's push, so a shard past that version applied it and only the reply is missing (lost, and
        being retried): the workers that left finished this step before leaving, and the retry will be
        answered. A shard that cannot say (moving to its backup) is asked again at the next check."""
        if self.job.mode is UpdateMode.ASYNC or len(self.versions) != len(self.ps.shards):
            return False
        for shard, before in zip(self.ps.shards, self.versions):
            now = shard.version(timeout=5.0)
            if now is not None and now <= before:
                return False
        return True

    def _local_norm(self, norm_type: float) -> float:
        grads = [p.grad for p in self._params() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads, norm_type)) if grads else 0.0

    def _begin(self, batch_size: int | None, clip: tuple[float, float] | None = None, overflow: bool = False,
               grad_scale: float = 0.0, exchange=None) -> _Step:
        """Start this step's pushes on every shard (or, with overlap, commit the ones backward started),
        then the added param groups' (``exchange``: the parent's clip exchange, for an added group's)."""
        added_groups.refuse_if_waited_for(self)
        if not self._moves_between_steps and self.flat.changed_since_scatter() and not self._warned_edit:
            self._warned_edit = True
            warnings.warn("the model's parameters changed since the last step outside the optimizer (an in-place "
                          "edit or model.load_state_dict); this step's reply overwrites them with the shards' "
                          "values. To make such an edit part of training call opt.upload_params() after it",
                          stacklevel=3)
        batch = 1 if batch_size is None else int(batch_size)
        hyper = optim.hyper_of(self.param_groups[:self._own_groups], self.job.schedulable())
        hyper_json = _json(hyper)
        max_norm, norm_type = clip if clip is not None else (0.0, 2.0)

        def options(shard) -> pb.StepOptions:
            r = shard.info.range
            return pb.StepOptions(batch_size=batch, hyperparams_json=hyper_json,
                                  grad_mask=self.flat.grad_mask(r.start, r.stop), overflow=overflow,
                                  grad_scale=grad_scale, clip_max_norm=max_norm, clip_norm_type=norm_type)

        blob = self._buffers_blob() if self._buffers and self.rank == 0 else None
        self.flat.fence()  # replies reach the device only after this step's forward and backward
        added = sum(len(ext.ps.shards) for ext in self.extensions)  # their shards report partials too
        if self._overlap is not None:
            self._overlap.exchange.shards = len(self.ps.shards) + added
            futures, exchange = self._overlap.commit(lambda k: options(self.ps.shards[k]), norm_type)
            self._inflight = _Step(futures, exchange, batch, clip is not None)
            self._begin_extensions(batch_size, clip, overflow, grad_scale, exchange)
            return self._inflight
        # Every shard's gradient is queued for the host first (on a GPU: cast and copied on a stream of
        # its own), then each push waits only for its own shard's bytes.
        staged = [None if overflow else self.flat.stage_grads(s.info.range.start, s.info.range.stop, self.ps.shm_ok[k])
                  for k, s in enumerate(self.ps.shards)]
        if clip and exchange is None:
            exchange = ClipExchange(len(self.ps.shards) + added, self.steps_taken, norm_type, self.step_timeout)
        futures = []
        for k, shard in enumerate(self.ps.shards):
            header = self._header()
            header.options.CopyFrom(options(shard))
            futures.append(self.ps.submit_push(shard, staged[k], self.flat.values, header,
                                               self.versions[shard.info.range.shard_id], clip=exchange, buffers=blob,
                                               landed=self.flat.scatter_range))
        self._inflight = _Step(futures, exchange, batch, clip is not None)
        self._begin_extensions(batch_size, clip, overflow, grad_scale, exchange)
        return self._inflight

    def _begin_extensions(self, batch_size, clip, overflow: bool, grad_scale: float, exchange) -> None:
        offset = len(self.ps.shards)
        for ext in self.extensions:
            ext._begin(batch_size, clip, overflow, grad_scale,
                       added_groups.ShiftedExchange(exchange, offset) if exchange is not None else None)
            offset += len(ext.ps.shards)

    def _finish(self, replies: list[PushReply], overflow: bool, under_scaler: bool) -> None:
        self.flat.scatter_params(ranges_done=True)  # each reply went to the device as it landed
        self.versions = [r.version for r in replies]
        for shard, r in zip(self.ps.shards, replies):
            self.history.record("acked", job=self.job_id, shard=shard.info.range.shard_id, worker=self.worker_id,
                                step=self.steps_taken, version=r.version, duplicate=r.duplicate, dropped=r.dropped)
        if self.flat.exposed:  # before the step returns: the pull moves the model to a new segment first
            # (naming this worker's epoch: a rollback meanwhile answers RolledBack at once, and step() rejoins,
            # instead of the pull waiting for a version the rolled-back shards may never reach again)
            self._pull(min(self.versions), epoch=self.epoch)
        self.last_replies = replies
        blob = next((r.buffers for r in replies if r.buffers is not None), None)
        if blob is not None and self.rank != 0:
            torch_compat.load_buffers(self._buffers, buffer_file.decode(blob))
        if any(r.skipped for r in replies) and under_scaler and not overflow:
            # Another worker overflowed: this worker's scaler must back off too, as under DDP.
            if not torch_compat.mark_overflow(torch_compat.grad_scaler_state()):
                warnings.warn("the step was skipped for an fp16 overflow on another worker, but the calling "
                              "GradScaler was not found to lower its scale", stacklevel=3)
        if max(r.epoch for r in replies) > self.epoch or self._heartbeat.view_changed.is_set():
            self._refresh_view()  # before the next step picks its data by rank
        # The shards say which step comes next: +1 normally; in sync mode with backup
        # workers a late worker whose push was dropped jumps to the open step.
        self.steps_taken = min(r.next_step for r in replies)
        if self._overlap is not None:
            self._overlap.arm(self._header(), self.versions)

    def _header(self) -> pb.PushHeader:
        return pb.PushHeader(worker_id=self.worker_id, step=self.steps_taken, epoch=self.epoch,
                             reply_dtype=self._reply_dtype)

    # ------------------------------------------------------------------ membership

    def _check_alive(self) -> None:
        if self._heartbeat.evicted:
            raise UnknownWorker(self._heartbeat.evicted)

    def _adopt(self, view) -> None:
        if self.worker_id not in view.worker_ids:
            self._heartbeat.evicted = (
                f"worker {self.worker_id} is not in the job's membership (epoch {view.epoch}): its lease ran out; "
                "register again (a new ShardedOptimizer) to rejoin")
            raise UnknownWorker(self._heartbeat.evicted)
        self.epoch = view.epoch
        self.rank = next(m.rank for m in view.members if m.worker_id == self.worker_id)
        self.world_size = len(view.members)

    def _refresh_view(self) -> None:
        """The membership changed: take this worker's new rank and the new world size."""
        self._heartbeat.view_changed.clear()
        self._adopt(self.coordinator.view(self.job_id, 0))

    @property
    def collectives(self) -> Collectives:
        """All-reduce, barrier and broadcast of small values among this job's workers
        (``worker.collectives``): losses and metrics to log, "rank 0 saved"."""
        if getattr(self, "_collectives", None) is None:
            self._collectives = Collectives(self.coordinator, self.job_id, self.worker_id, self.step_timeout)
        return self._collectives

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
            self._overlap.arm(self._header(), self.versions)

    # ------------------------------------------------------------------ torch.optim's API

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Where they are views into the push bucket (an fp32 CPU model, or a
        model on one device with one dtype) they are zeroed in place (as DDP's
        gradient_as_bucket_view); with ``set_to_none`` a parameter then counts as having no
        gradient until backward writes one, as torch sees ``p.grad is None``."""
        if self.flat.bound:  # gradients are views into the bucket (CPU fp32, or one device and dtype)
            self.flat.zero_grads(set_to_none)
        elif not self.extensions:
            super().zero_grad(set_to_none)
        else:  # torch's zero_grad, on this job's own groups (each added group zeroes its own)
            for p in (p for g in self.param_groups[:self._own_groups] for p in g["params"] if p.grad is not None):
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()
        for ext in self.extensions:
            ext.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's: the group's parameters are updated from the next ``step()`` on. Every worker of the
        job must add the same group (names, shapes, hyper-parameters) before the same step; this call
        blocks until they all did (at most the step timeout) and raises FailedPrecondition naming the
        group, the step and the fix if one added another group or none (nothing is added then). The
        group becomes a job of its own on the same servers (``worker.param_groups``)."""
        if getattr(self, "_constructing", False):
            super().add_param_group(param_group)
        else:
            added_groups.add(self, param_group)

    def _extension(self, params: list[tuple[str, torch.Tensor]], kwargs: dict[str, Any],
                   job: str, first_step: int = 0) -> "ShardedOptimizer":
        """A ShardedOptimizer of job ``job`` over ``params`` (an added param group) whose versions start at
        ``first_step``, on this one's cluster with its settings: built here so that ``worker.param_groups``
        need not import this module (which imports it)."""
        return ShardedOptimizer([{"params": params, **kwargs}], optimizer=self.job.optimizer, job=job,
                                min_workers=self.world_size, first_step=first_step, **self._extend_args)

    def no_sync(self):
        """Context manager for gradient-accumulation micro-batches (as DDP's): with ``overlap=True``,
        backward inside it pushes nothing; the next backward outside it pushes the sum."""
        return self._overlap.no_sync() if self._overlap is not None else contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state gathered from every shard, in ``torch.optim``'s format: it loads
        into the stock torch class built over the same param groups (frozen parameters included)."""
        shards = [tensors for _, tensors, _ in self.ps.pull_state()]
        own = optimizer_state_dict(self.job, shards, self.param_groups[:self._own_groups])
        return merge_state([own, *(ext.state_dict() for ext in self.extensions)])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take over a torch.optim state_dict (the stock class's, or this class's): the param
        groups' hyper-parameters here, the per-parameter state on the shards. Call it between
        two steps (e.g. before training) on every worker with the same state; loading it again
        changes nothing."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups) if isinstance(groups, list) else 'no'} param "
                             f"groups; this optimizer has {len(self.param_groups)}")
        for mine, saved in zip(self.param_groups, groups):
            if len(saved.get("params", [])) != len(mine["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
        own, *added = added_groups.split_state(state_dict, [self.job, *(ext.job for ext in self.extensions)],
                                               self._own_groups)
        per_shard = split_optimizer_state(self.job, own, [s.info.range for s in self.ps.shards])
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        self.ps.load_state(per_shard, _json(optim.hyper_of(self.param_groups[:self._own_groups],
                                                           self.job.schedulable())))
        for ext, part in zip(self.extensions, added):
            ext.load_state_dict(part)

    def close(self) -> None:
        """Leave the job and close every channel. Safe to call twice."""
        if getattr(self, "ps", None) is None:
            return
        for ext in self.extensions:
            ext.close()
        if self._overlap is not None:
            self._overlap.close()
        self._heartbeat.stop()
        self.flat.close()
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


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))
