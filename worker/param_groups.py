"""Param groups added during training: ``ShardedOptimizer.add_param_group``.

torch's ``add_param_group`` (ULMFiT's progressive unfreezing, Lightning's
``BackboneFinetuning``) appends a group whose parameters the next ``step()`` updates.
On shardps those parameters' values and optimizer state must live on the shard
servers, so adding a group extends the job (docs/architecture/torch-semantics.md):

1. Agreement. Every worker of the job adds the same group (parameter names and
   shapes, hyper-parameters) at the same step boundary (sync and ssp: before the same
   ``step()``). The workers meet in a coordinator collective named after the group's
   index and the step. A worker that pushes that step without the group learns from
   its heartbeat that the others wait for it there: it refuses (so they fail at once)
   and raises. Any difference fails the call on every worker with an error naming
   the group, the step and the fix; nothing was created and the job is unchanged.
2. Extension. The group becomes a job of its own on the same cluster, named
   ``<job>.g<index>``: its flat vector is the new parameters laid end to end, cut
   across the same servers (each gets one more shard; none of the job's shards
   move), and its optimizer state lives on those shards. The first worker to
   register it uploads the values (the model's, equal on every worker).
3. Stepping. From then on every step pushes the job's shards and the extension's
   together, ``clip_grad_norm_`` clips by the norm over both, and ``state_dict``,
   ``load_state_dict`` and ``model_state_dict`` read and write both as one torch
   optimizer's.
4. Rollbacks and joins. In sync and ssp jobs the extension's versions are the job's
   steps (it starts at the step it was added at), so both checkpoint the same steps and
   a server restart rolls both back to one (``follow_rollbacks``). A worker that comes
   after a group was added is refused with the fix (``refuse_late_join``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from ..proto import optim
from ..proto.errors import FailedPrecondition, RolledBack, Unavailable, WaitTimeout
from ..proto.messages import UpdateMode, added_group_job, added_group_jobs
from . import torch_compat
from .collectives import decode, encode

if TYPE_CHECKING:  # types only
    from ..coordinator.client import CoordinatorClient
    from ..proto.messages import JobConfig
    from .collectives import Collectives
    from .heartbeat import Heartbeat


class GroupHost(Protocol):
    """What this module needs of the optimizer whose param groups change (``ShardedOptimizer``, which
    calls in here and builds the extensions itself: ``_extension``), so that it never imports it."""

    param_groups: list[dict[str, Any]]
    extensions: list[Any]  # the added groups' optimizers, each a GroupHost too
    steps_taken: int
    step_timeout: float
    worker_id: int
    job_id: str
    job: "JobConfig"
    coordinator: "CoordinatorClient"
    _module: torch.nn.Module | None
    _inflight: object | None
    _heartbeat: "Heartbeat"

    @property
    def collectives(self) -> "Collectives": ...

    def _extension(self, params: list[tuple[str, torch.Tensor]], kwargs: dict[str, Any], job: str,
                   first_step: int = 0) -> Any: ...

    def _rejoin(self, rollback: RolledBack) -> Any: ...

PREFIX = "add_param_group#"  # the agreement collective's name: PREFIX + index [+ "@" + step]
FIX = ("every worker must call add_param_group with the same parameters (names and shapes) and the same "
       "hyper-parameters before the same step()")


def add(opt: GroupHost, param_group: dict[str, Any]) -> None:
    """Add ``param_group`` to ``opt`` and to its job. Blocks until every worker added it (at most the
    step timeout) and the extension's shards hold the parameters. On any error (torch's own checks,
    a worker that added another group or none) ``opt`` and the job are as they were."""
    if opt._inflight is not None:
        raise RuntimeError("add_param_group between clip_grad_norm_ and step(): this step's pushes started "
                           "without the group; add it after step() (or before backward)")
    index = len(opt.param_groups)
    # torch's checks and its defaults (the host is a torch Optimizer: ShardedOptimizer)
    torch.optim.Optimizer.add_param_group(cast(torch.optim.Optimizer, opt), param_group)
    try:
        group = opt.param_groups[index]
        _, names, _, _ = torch_compat.describe_params([group], opt._module)
        names = [n if opt._module is not None or group.get("param_names") else f"group{index}.{n}" for n in names]
        kwargs = optim.group_kwargs(opt.job.optimizer, opt.job.optimizer_kwargs, group)
        agree(opt, index, {"names": names, "shapes": [list(p.shape) for p in group["params"]], "hyper": kwargs})
        child = _extend(opt, index, group, names, kwargs)
    except BaseException:
        del opt.param_groups[index:]
        raise
    if "param_names" not in group:  # torch refuses named and unnamed groups side by side
        child.param_groups[0].pop("param_names", None)
    opt.param_groups[index] = child.param_groups[0]  # one dict: a scheduler's edit reaches the extension
    opt.extensions.append(child)


def agree(opt: GroupHost, index: int, group: dict[str, Any]) -> None:
    """Meet every worker in the collective for group ``index``; raise FailedPrecondition naming the
    group, the step and the fix unless all brought the same group (sync and ssp: at the same step)."""
    step = opt.steps_taken
    sync = opt.job.mode is not UpdateMode.ASYNC
    name = PREFIX + str(index) + (f"@{step}" if sync else "")
    # As the others will read it (JSON: tuples become lists). In sync and ssp jobs the step is in the name too.
    mine = decode(encode({"step": step, "group": group}))
    what = (f"param group {index} ({len(group['names'])} parameters: {', '.join(group['names'][:4])}"
            f"{', ...' if len(group['names']) > 4 else ''}) added before step {step} of job {opt.job.name!r}")
    try:
        parts = opt.collectives.all_gather(mine, name=name, timeout=opt.step_timeout)
    except WaitTimeout:  # e.g. an ssp worker ahead added it before a later step, or one never pushes again
        raise FailedPrecondition(f"{what}: not every worker added it within the step timeout "
                                 f"({opt.step_timeout:.0f}s); nothing was added ({FIX})") from None
    for rank, theirs in enumerate(parts):
        if theirs.get("refused"):
            raise FailedPrecondition(f"{what}: the worker of rank {rank} pushed step {theirs['step']} without it; "
                                     f"nothing was added ({FIX})")
        if theirs != mine:
            raise FailedPrecondition(f"{what}: the worker of rank {rank} added a different group "
                                     f"({'; '.join(_differences(mine['group'], theirs['group']))}); nothing was added ({FIX})")


def _differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    out = [f"{k}: {theirs.get(k)} there, {mine[k]} here" for k in ("names", "shapes") if theirs.get(k) != mine[k]]
    hyper, other = mine["hyper"], theirs.get("hyper", {})
    out += [f"{k}: {other.get(k)} there, {hyper.get(k)} here" for k in sorted(set(hyper) | set(other))
            if hyper.get(k) != other.get(k)]
    return out


def refuse_if_waited_for(opt: GroupHost) -> None:
    """Raise FailedPrecondition if the other workers wait for this one to add a param group before a
    step it is pushing now (sync and ssp jobs; called while pushing). It first answers their
    collective with a refusal, so that they fail at once instead of at their timeout."""
    if opt.job.mode is UpdateMode.ASYNC:
        return
    for name in opt._heartbeat.collectives_waiting:
        index, _, step = name.removeprefix(PREFIX).partition("@")
        if not name.startswith(PREFIX) or not index.isdigit() or not step.isdigit():
            continue
        if int(step) > opt.steps_taken or int(index) < len(opt.param_groups):
            continue  # a step this worker has not reached (it may add the group yet), or one it has
        payload = encode({"refused": True, "step": opt.steps_taken})
        try:
            opt.coordinator.collective(opt.job_id, opt.worker_id, name, 0, payload, 0.0)
        except Exception:  # noqa: BLE001 - the refusal only speeds the others up; this worker's error is the point
            pass
        raise FailedPrecondition(
            f"the other workers of job {opt.job.name!r} added param group {index} before step {step}, and this "
            f"worker pushed step {opt.steps_taken} without it; nothing was added ({FIX})")


def follow_rollbacks(opt: GroupHost) -> None:
    """After a step in which a rollback reached some of the job and its added groups' jobs but not the
    others (their replies came before it): those still ahead go back too, to the step the rollback chose
    for all of them (``coordinator.state.report_restore`` rolls them back together under one lock, so
    their rollback views exist once one of them was told). Sync and ssp jobs without backup workers,
    whose jobs are at one step otherwise. Raises FailedPrecondition if the views disagree."""
    if not opt.extensions or opt.job.mode is UpdateMode.ASYNC or opt.job.backup_workers:
        return
    parts = [opt, *opt.extensions]
    target = min(p.steps_taken for p in parts)
    for part in (p for p in parts if p.steps_taken != target):
        view = part.coordinator.view(part.job_id, 0)
        if view.start_step != target:
            raise FailedPrecondition(
                f"job {part.job.name!r} is at step {part.steps_taken} and its latest view starts at step "
                f"{view.start_step}, but the jobs of one optimizer rolled back to step {target}; restart the "
                "workers from a checkpoint")
        part._rejoin(RolledBack.at(target, view.epoch))


def refuse_late_join(opt: GroupHost, joined_at: int | None = None) -> None:
    """Raise FailedPrecondition naming them and the fix if param groups were added to this worker's job
    before it came (an elastic join after ``add_param_group``). Called before registering, so that a
    refused worker leaves the job as it was, and again once it joined at step ``joined_at`` (a group added
    while it waited to join: sync and ssp, one added before that step). Such a worker would train the job's
    parameters against stale values of the added ones and never push their gradients; and it cannot take
    them on as it joins: its join step is agreed with the job's shards, not with the added groups' jobs
    (each has its own membership)."""
    try:
        names = added_group_jobs(opt.job.name, opt.coordinator.status().job_names)
    except Unavailable:
        if joined_at is None:  # a coordinator still starting: registration waits longer; ask again once joined
            return
        raise
    added = []
    for name in names:
        _, job, _ = opt.coordinator.job(name=name)
        late = joined_at is None or opt.job.mode is UpdateMode.ASYNC or job is None or job.first_step < joined_at
        if job is not None and late:
            params = [e.name for e in job.layout.params]
            added.append(f"{name} (added before step {job.first_step}: {', '.join(params[:4])}"
                         f"{', ...' if len(params) > 4 else ''})")
    if added:
        raise FailedPrecondition(
            f"job {opt.job.name!r} had param groups added during training ({'; '.join(added)}), and a worker "
            "cannot join it after that; start every worker before add_param_group (min_workers), or restart the "
            "run with every worker building the optimizer with those groups from the start, loading the model "
            f"and opt.state_dict() saved by this job's workers, under a new job name")


def _extend(opt: GroupHost, index: int, group: dict[str, Any], names: list[str],
            kwargs: dict[str, Any]) -> GroupHost:
    """The ShardedOptimizer of the extension job that holds ``group`` (registered, its shards initialised)."""
    # Sync and ssp: its versions are the job's steps (it starts at this one), so that the two jobs checkpoint
    # the same steps and roll back together (coordinator.state.report_restore). Async versions count pushes.
    first = opt.steps_taken if opt.job.mode is not UpdateMode.ASYNC else 0
    return opt._extension(list(zip(names, group["params"])), kwargs, added_group_job(opt.job.name, index), first)


class ShiftedExchange:
    """An extension's view of its parent's clip exchange: its shards report under indices after the
    parent's (and earlier extensions'), so one total norm covers every parameter."""

    def __init__(self, exchange, offset: int):
        self._exchange, self._offset = exchange, offset

    def report(self, shard: int, partial: float) -> None:
        self._exchange.report(shard + self._offset, partial)

    def __getattr__(self, name):
        return getattr(self._exchange, name)


def split_state(state_dict: dict, jobs: list, own_groups: int) -> list[dict]:
    """A torch.optim state_dict cut into the job's part (its first ``own_groups`` groups) and one part
    per added group, each numbered from 0 in its groups' order (torch matches ids by position)."""
    saved, state = state_dict["param_groups"], state_dict.get("state", {})
    if not isinstance(state, dict):
        raise ValueError("the state dict's 'state' must map parameter ids to their state")
    spans = [saved[:own_groups]] + [[g] for g in saved[own_groups:]]
    out = []
    for groups in spans:
        ids = [i for g in groups for i in g["params"]]
        local = {i: k for k, i in enumerate(ids)}
        out.append({"state": {local[i]: state[i] for i in ids if i in state},
                    "param_groups": [{**g, "params": [local[i] for i in g["params"]]} for g in groups]})
    return out
