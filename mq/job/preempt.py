"""Preemption, time limits and scancel: turn signals into a fresh checkpoint at a step boundary.

A signal handler runs between two bytecodes of the training step, when the model, optimizers and
meta net are half updated; saving there would store a state that never existed. So the handlers
only record the signal, and the training loop polls :meth:`GracefulStop.poll` between steps:

- the preemption signal (SIGUSR2 under submitit: sent before a time limit, and by
  ``job._interrupt()``): save a checkpoint, then hand the signal to submitit's own handler,
  which calls the launcher's ``checkpoint()``, requeues the job and exits. The requeued job
  resumes from that checkpoint.
- SIGTERM (scancel; also the first signal of a preemption): save a checkpoint and mark the run
  as failed in summary.json (a SIGKILL follows within SLURM's KillWait). Under submitit the job
  keeps going, as submitit itself ignores SIGTERM, so that a SIGUSR2 that follows still
  requeues it; a plain process (no one else handles SIGTERM) stops.

Handlers are installed only inside the ``with`` block and restored after it: importing this
module changes nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"  # poll(): save a checkpoint now and go on
STOP = "stop"  # poll(): save a checkpoint now, then stop (raise Interrupted)


def preempt_signal() -> signal.Signals:
    """submitit's preemption / time-limit signal (it reads the same variable)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


def _is_default(handler: Any) -> bool:
    return handler in (signal.SIG_DFL, signal.SIG_IGN, None)


class GracefulStop:
    """Context manager; ``poll()`` says what the training loop should do at a step boundary.

    ``on_terminate(reason)`` is called from ``poll()`` (the main thread, between steps, never
    inside a handler) the first time a signal is seen, to mark the run in its ledger.
    ``grace_s``: if the loop has not reached a step boundary that long after the preemption
    signal (a long evaluation), submitit's handler is run anyway so the job is still requeued
    (from the last periodic checkpoint).
    """

    def __init__(
        self, on_terminate: Callable[[str], None] | None = None, grace_s: float = 60.0
    ) -> None:
        self.on_terminate = on_terminate
        self.grace_s = grace_s
        self.received: signal.Signals | None = None
        self._pending: str | None = None
        self._marked = False
        self._expired = False
        self._previous: dict[signal.Signals, Any] = {}
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ install / restore ----
    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        wanted = [signal.SIGTERM]
        usr = preempt_signal()
        # Only where someone (submitit) handles the preemption signal is there a requeue to do.
        if not _is_default(signal.getsignal(usr)):
            wanted.append(usr)
        for sig in wanted:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    # ---------------------------------------------------------------------------- signals ----
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        previous = self._previous.get(sig)
        if sig == signal.SIGTERM:
            log.warning("SIGTERM: checkpointing at the next step boundary")
            self.received = self.received or sig
            if _is_default(previous):
                self._pending = STOP
            else:
                self._pending = self._pending or CHECKPOINT
                previous(signum, frame)  # submitit's handler only logs it ("bypassing")
            return
        if self._expired:  # the loop did not get there in time: requeue from here
            previous(signum, frame)
            return
        log.warning("%s: checkpointing at the next step boundary, then requeueing", sig.name)
        self.received = sig
        self._pending = STOP
        self._timer = threading.Timer(self.grace_s, self._expire, args=(signum,))
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, signum: int) -> None:
        self._expired = True
        log.warning("no step boundary %.0f s after the signal: requeueing now", self.grace_s)
        os.kill(os.getpid(), signum)  # runs _handle again, in the main thread

    # ------------------------------------------------------------------------ main thread ----
    def poll(self) -> str | None:
        """None (go on), CHECKPOINT or STOP; each request is returned once."""
        action, self._pending = self._pending, None
        if action is not None and not self._marked and self.on_terminate is not None:
            self._marked = True
            assert self.received is not None
            self.on_terminate(f"interrupted by {self.received.name}")
        return action

    def hand_over(self) -> None:
        """After the checkpoint for a STOP: let the signal's previous owner act. Under submitit
        this requeues the job and exits (SystemExit); otherwise nothing happens here."""
        if self._timer is not None:
            self._timer.cancel()
        sig = self.received
        previous = self._previous.get(sig) if sig is not None else None
        if sig is not None and sig != signal.SIGTERM and not _is_default(previous):
            self.__exit__()
            previous(sig, None)
