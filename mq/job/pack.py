"""Train a pack of runs together (mq.meta.pack fuses their networks): every run keeps its own
loop (mq.job.train.Training: its data order, lr schedule, logs, checkpoints, evaluation and
summary), and the driver here takes the steps they ask for, all at once.

Runs of a pack have the same number of steps per epoch and the same epochs, so they ask for a
step at the same step count, except after a relaunch that found their checkpoints at different
steps (a kill between two runs' saves): then the runs that are behind take steps on their own
until they have caught up. A run that ends (diverged: a NaN loss) leaves the pack; the others
go on in a pack of the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from typing import Any

from torch import Tensor

from mq.job.train import Interrupted, Training
from mq.meta.pack import Pack

log = logging.getLogger(__name__)

Session = Generator[tuple[Tensor, Tensor], tuple[Tensor, Tensor], dict[str, Any]]


class SharedInterrupt:
    """One signal poll for the whole pack, seen alike by every run's loop: ``refresh`` polls
    once between pack steps; each loop's ``interrupt`` reads the request of that round."""

    def __init__(self, poll: Callable[[], str | None]) -> None:
        self.poll, self.action = poll, None

    def refresh(self) -> None:
        self.action = self.poll()

    def __call__(self) -> str | None:
        return self.action


def train_pack(
    loops: Sequence[Training], shared: SharedInterrupt | None = None, fuse: bool | None = None
) -> list[dict[str, Any]]:
    """Run every loop to its end, their steps fused where they are at the same step; returns
    their summaries in order. ``shared``: the interrupt the loops were given, if any; ``fuse``:
    as mq.meta.pack.Pack's (None: fused on a GPU, one network after another on a CPU)."""
    sessions: dict[int, Session] = {k: loop.session() for k, loop in enumerate(loops)}
    summaries: dict[int, dict[str, Any]] = {}
    asks: dict[int, tuple[Tensor, Tensor]] = {}
    for k in list(sessions):
        _advance(k, sessions, asks, summaries, None)
    pack, members = None, ()
    stopped: list[Interrupted] = []
    while asks and not stopped:
        if tuple(asks) != members:  # a run ended: the others go on without it
            members = tuple(asks)
            if len(members) > 1:
                models, steps = [loops[k].model for k in members], [loops[k].step for k in members]
                pack = Pack(models, steps, fuse)
                how = "one fused network" if pack.fused else "one network after another"
                log.info("training %d runs as one pack (%s)", len(members), how)
        if shared is not None:
            shared.refresh()
        lowest = min(loops[k].progress.step for k in asks)
        behind = [k for k in asks if loops[k].progress.step == lowest]
        if len(behind) == 1:  # alone: the run's own step, as in a run of its own
            results = [loops[behind[0]].step.train_step(*asks[behind[0]])]
        elif len(behind) == len(asks):
            assert pack is not None
            results = pack.train_step([asks[k][0] for k in behind], [asks[k][1] for k in behind])
        else:  # catching up alone with the others (their checkpoints were at a later step)
            results = [loops[k].step.train_step(*asks[k]) for k in behind]
        for k, result in zip(behind, results, strict=True):
            try:
                _advance(k, sessions, asks, summaries, result)
            except Interrupted as exc:  # saved its checkpoint: let the others save theirs
                stopped.append(exc)
    if stopped:
        raise stopped[0]
    return [summaries[k] for k in range(len(loops))]


def _advance(
    k: int,
    sessions: dict[int, Session],
    asks: dict[int, tuple[Tensor, Tensor]],
    summaries: dict[int, dict[str, Any]],
    result: tuple[Tensor, Tensor] | None,
) -> None:
    """Give run ``k`` its step's result (None: start it); note its next batch or its summary."""
    try:
        session = sessions[k]
        asks[k] = next(session) if result is None else session.send(result)
    except StopIteration as done:
        summaries[k] = done.value
        asks.pop(k, None)
        del sessions[k]
