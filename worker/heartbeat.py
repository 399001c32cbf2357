"""The worker's lease: a daemon thread renews it every lease / 3 seconds from registration on.

Each beat reports the worker's step and fault counters (for status). The thread
notes, for the training thread to act on, a newer membership epoch (``view_changed``:
its rank may have changed), an eviction (``evicted``: the lease ran out and the worker
must register again), and why the job cannot go on when it cannot (``waiting_for``,
logged when it appears; ``abandoned`` when the other workers left the job), and the
collectives the other members wait in for this worker (``collectives_waiting``: a param
group they added, see ``worker.param_groups``).
"""
from __future__ import annotations

import logging
import threading

from ..proto.errors import UnknownWorker

log = logging.getLogger("shardps.worker")


class Heartbeat:
    def __init__(self, opt):
        self.opt, self._stop = opt, threading.Event()
        self.view_changed = threading.Event()
        self.evicted = ""  # why this worker is no longer in the job ("" while it is)
        self.waiting_for = ""  # why the job cannot make progress ("" while it can)
        self.abandoned = False  # the other workers left: a step that needs them will never close
        self.collectives_waiting: tuple[str, ...] = ()  # collectives the other members wait in for this worker
        self._thread = threading.Thread(target=self._run, name="shardps-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = 0.0  # the first heartbeat at once
        while not self._stop.wait(interval):
            opt = self.opt
            try:
                reply = opt.coordinator.heartbeat(opt.job_id, opt.worker_id, getattr(opt, "steps_taken", 0),
                                                  opt.counters())
            except UnknownWorker as exc:
                self.evicted = str(exc)
                return
            except Exception as exc:  # coordinator unreachable for a moment: the lease has slack
                log.warning("heartbeat failed: %s", exc)
                interval = 0.5
                continue
            epoch, lease = reply.epoch, reply.lease_ms / 1000.0
            interval = max(0.05, lease / 3)
            if reply.waiting_for and reply.waiting_for != self.waiting_for:
                log.warning("job %s cannot go on: %s", opt.job.name, reply.waiting_for)
            self.waiting_for, self.abandoned = reply.waiting_for, reply.abandoned
            self.collectives_waiting = tuple(reply.collectives_waiting)
            if epoch > getattr(opt, "epoch", epoch):
                self.view_changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
