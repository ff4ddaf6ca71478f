"""The folder name of a sweep launched without ``sweep_name`` (conf/config.yaml's default null):
what it sweeps, readable, plus a hash of everything that defines it.

``-m meta=ste,multifc bits=1,2 epochs=1`` -> ``bits=1,2+meta=ste,multifc-3f2a9c1d``. Two sweeps
that differ in any override (swept or fixed) get two folders (and two wandb groups, two tables),
while the same command again finds its own folder and resumes it. Keys that do not change
results (mq.cli.conf.exclude_keys: logger, progress, ...) stay out, as they do of job folders, and
so do the tuning budget and parallelism, which a relaunch may raise. The +sweep presets set
``sweep_name`` themselves.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser

HASH_CHARS = 8
MAX_READABLE = 80  # characters of swept values before the hash; whole items only
# Sweeper settings a relaunch may change without making it another sweep.
RELAUNCH_KEYS = (
    "hydra.sweeper.trials",
    "hydra.sweeper.parallel",
    "hydra.sweeper.final_seeds",
    "hydra.sweeper.final_defaults",
    "hydra.sweeper.max_batch_size",
)


def _clean(text: str) -> str:
    """A folder-name-safe spelling (mq.job.rundir.NAME): glob(*) -> glob_x_."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text.replace("*", "x"))


def sweep_name(task: Iterable[str], hydra: Iterable[str], exclude: Iterable[str]) -> str:
    """The name of a sweep launched with the task overrides ``task`` and the Hydra overrides
    ``hydra`` (only ``hydra/sweeper`` and ``hydra.sweeper.*`` count), leaving out ``exclude``."""
    excluded = set(exclude)
    parser = OverridesParser.create()
    kept = [
        o
        for o in parser.parse_overrides([str(t) for t in task])
        if o.key_or_group not in excluded and o.get_key_element() != "sweep_name"
    ]
    sweeper = [
        o
        for o in parser.parse_overrides([str(h) for h in hydra])
        if (o.key_or_group == "hydra/sweeper" or o.key_or_group.startswith("hydra.sweeper."))
        and o.key_or_group not in RELAUNCH_KEYS
    ]
    lines = sorted(str(o.input_line) for o in kept + sweeper)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:HASH_CHARS]
    swept = sorted(str(o.input_line) for o in kept if o.is_sweep_override()) or sorted(
        str(o.input_line) for o in kept
    )
    readable = ""
    for item in map(_clean, swept):
        joined = f"{readable}+{item}" if readable else item
        if len(joined) > MAX_READABLE:
            break
        readable = joined
    readable = readable.lstrip(".") or "multirun"
    return f"{readable}-{digest}"
