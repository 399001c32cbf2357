"""What a shard checks about a call before it takes the lock: sizes, step options, hyper-parameters,
finite values, buffers.

Invariant: a check that fails counts the rejection by its reason (``reject``, which takes the
shard's lock) and raises ``InvalidArgument`` naming the fix; it changes nothing else, so a
refused push leaves the state byte-identical. A check reads only what never changes for a shard
(its range, its job, its optimizer's pieces) and its own cache of the last hyper-parameters.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..proto import buffers as buffer_file
from ..proto import optim
from ..proto.errors import InvalidArgument
from ..proto.messages import MAX_GRAD_SCALE, JobConfig
from ..proto.plan import ShardRange
from .steps import Push


class PushChecks:
    def __init__(self, shard: ShardRange, job: JobConfig, pieces: int, reject: Callable[[str], None]):
        """``pieces``: the slice optimizer's pieces (a push's mask names them); ``reject(reason)``
        counts a refusal."""
        self.shard, self.job, self.pieces, self.reject = shard, job, pieces, reject
        self._hyper_cache: tuple[str, list] = ("", [])  # the last hyper-parameters parsed (usually every push's)

    def check_buffers(self, blob: bytes | None) -> None:
        """Refuse buffers that are not exactly the job's (or sent to a shard that keeps none)."""
        if blob is None:
            return
        if self.shard.shard_id != 0 or not self.job.buffers:
            self.reject("bad_buffers")
            raise InvalidArgument("only shard 0 of a job with buffers takes buffers")
        try:
            buffer_file.check(blob, self.job.buffers)
        except ValueError as exc:
            self.reject("bad_buffers")
            raise InvalidArgument(str(exc)) from None

    def parse_hyper(self, text: str) -> list | None:
        """The job groups' kwargs with a push's hyper-parameters applied (None for ""), checked."""
        if not text:
            return None
        cached_text, cached = self._hyper_cache
        if text == cached_text:
            return cached
        try:
            parsed = optim.parse_hyper(self.job.optimizer, self.job.groups, text)
        except ValueError as exc:
            self.reject("bad_hyperparameters")
            raise InvalidArgument(str(exc)) from None
        self._hyper_cache = (text, parsed)
        return parsed

    def replica_parts(self, hyper_json: str, tensors: dict[str, torch.Tensor]) -> tuple[bytes | None, list | None]:
        """A replica update's or whole copy's buffers file and hyper-parameters, checked."""
        buffers = tensors.get("buffers")
        blob = buffers.numpy().tobytes() if buffers is not None else None
        self.check_buffers(blob)
        return blob, self.parse_hyper(hyper_json)

    def validate(self, push: Push) -> None:
        """Check everything about ``push`` that needs no lock; fill in its parsed fields."""
        try:
            push.options.check(self.pieces)
        except ValueError as exc:
            self.reject("bad_options")
            raise InvalidArgument(str(exc)) from None
        push.present = push.options.present(self.pieces)
        push.hyper = self.parse_hyper(push.options.hyper_json)
        self.check_buffers(push.buffers)
        if push.stops is not None:
            if push.options.clipped or push.present is not None or push.options.overflow:
                self.reject("bad_options")
                raise InvalidArgument("a push in parts cannot be clipped, masked or an overflow vote (its parts are "
                                      "applied as they come): send it whole")
            return  # its parts are checked as they arrive (``validate_grad`` with ``numel``)
        if push.options.overflow:
            return  # an overflow vote: its gradient (if any) is never read
        if push.grad is None:
            self.reject("bad_size")
            raise InvalidArgument("push carried no gradient chunks (only an fp16 overflow vote may)")
        self.validate_grad(push.grad, push.options.grad_scale)

    def validate_grad(self, grad: torch.Tensor, grad_scale: float = 0.0, numel: int | None = None) -> None:
        """Reject a gradient of the wrong size, with NaN/Inf values, or one that its loss scale's
        reciprocal would overflow to Inf when the step unscales it (counted, state unchanged).
        ``numel``: the size expected (a part of a push in parts); default the shard's."""
        if grad.numel() != (self.shard.numel if numel is None else numel):
            self.reject("bad_size")
            raise InvalidArgument(
                f"gradient has {grad.numel()} elements, shard {self.shard.shard_id} owns "
                f"[{self.shard.start}, {self.shard.stop}) = {self.shard.numel}"
            )
        if not grad_scale or grad_scale == 1.0:
            if not all_finite(grad):
                self.reject("nonfinite")
                raise InvalidArgument("gradient contains NaN or Inf; the push was rejected and nothing was applied")
            return
        largest = _largest_magnitude(grad)  # NaN when any element is
        if not math.isfinite(largest):
            self.reject("nonfinite")
            raise InvalidArgument("gradient contains NaN or Inf; the push was rejected and nothing was applied")
        if largest / grad_scale > MAX_GRAD_SCALE / 2:  # the unscaled gradient (float32) would hold Inf; /2: the
            # weighted mean of such terms stays finite after rounding
            self.reject("nonfinite")
            raise InvalidArgument(
                f"grad_scale {grad_scale:.3g} unscales this gradient (largest |value| {largest:.3g}) past float32's "
                f"range: the unscaled gradient would be Inf; the push was rejected and nothing was applied (send "
                f"the loss scale the gradient was multiplied by, or unscale on the worker)")


def _largest_magnitude(t: torch.Tensor) -> float:
    """max |t| (NaN when an element is NaN), without an elementwise copy."""
    if not t.numel():
        return 0.0
    low, high = torch.aminmax(t)
    low_f, high_f = float(low), float(high)
    return math.nan if math.isnan(low_f) or math.isnan(high_f) else max(-low_f, high_f)


def all_finite(t: torch.Tensor) -> bool:
    """Exact check for NaN/Inf. A float32 sum (~2 ms per 25M elements) is finite whenever
    every element is, unless finite values overflow it; only then pay for the elementwise
    check (~60-80 ms)."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())
