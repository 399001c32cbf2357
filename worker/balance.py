"""Which rows of every global batch this worker trains on, equal or balanced by throughput.

    split = BatchSplit(opt, per_worker=32)          # global batch = 32 x the job's min_workers
    for step ...:
        lo, hi = split.rows(step)                   # this rank's rows of global batch `step`
        t0 = time.perf_counter(); ...forward/backward...
        split.measured(hi - lo, time.perf_counter() - t0)

With the job's ``balance_every`` = N > 0, the worker reports its compute throughput
to the coordinator at the start of every window of N steps and gets the window's
split back (see ``coordinator.splitter.BatchSplitter``); a worker twice as fast then
takes about twice the rows, so all workers finish a step at about the same time.
The global batch never changes, so neither does sync training's math; it is
``per_worker`` times the job's ``min_workers`` (not the current world size), so a
worker that joins later, or a job that lost a worker, still cuts the same rows.
"""
from __future__ import annotations


class BatchSplit:
    def __init__(self, opt, per_worker: int):
        self.opt, self.every = opt, opt.job.balance_every
        self.global_batch = per_worker * opt.job.min_workers
        self.sizes: tuple[int, ...] = (per_worker,) * opt.job.min_workers
        self._window, self._samples, self._seconds = -1, 0, 0.0

    def rows(self, step: int) -> tuple[int, int]:
        """[lo, hi) of global batch ``step`` for this worker's rank."""
        if self.every:
            window = step // self.every
            if window != self._window:
                rate = self._samples / self._seconds if self._seconds > 0 else 0.0
                self.sizes = self.opt.coordinator.report_throughput(
                    self.opt.job_id, self.opt.worker_id, window, rate, self.global_batch)
                self._window, self._samples, self._seconds = window, 0, 0.0
        if len(self.sizes) != self.opt.world_size:  # the membership changed: the same rows, split anew
            from ..coordinator.splitter import proportional_split

            self.sizes = proportional_split(self.global_batch, [1.0] * self.opt.world_size)
        lo = sum(self.sizes[:self.opt.rank])
        return lo, lo + self.sizes[self.opt.rank]

    def measured(self, samples: int, compute_seconds: float) -> None:
        """Count one step's samples and compute time (not time spent waiting for the shards)."""
        self._samples += samples
        self._seconds += compute_seconds
