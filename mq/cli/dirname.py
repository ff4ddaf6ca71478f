"""Path-safe sweep folder names: Hydra's ``job.override_dirname``, except that a value holding a
``/`` (a path) becomes its last component's stem plus a hash of the whole value.

Hydra's own name puts a path value in the folder name as written, so
``model.pretrained=/abs/ckpt/x.pth`` nests folders (hydra#1832, #3018) and makes a 190-character
wandb run name. ``conf/config.yaml`` builds the sweep subdir with ``${mq.subdir:...}`` instead:
``model.pretrained=x-1a2b3c4d``; two different paths never share a folder (the hash is of the
value as written), and every name without a path is byte for byte Hydra's, so sweeps launched
before keep finding their completed jobs.

The resolver is registered by ``mq.cli.resolvers.register_resolvers()``: launch.py calls it
before Hydra starts, and each submitit job (mq.sweep.launcher.SubmititJob) before Hydra resolves
its folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

RESOLVER = "mq.subdir"
HASH_CHARS = 8
# File systems refuse names over 255 bytes (ENAMETOOLONG). A longer name (a tuning trial with
# many keys) is shortened without cutting any value: long floats become their own rounding plus
# a hash of the value (1.79e-3~0678), then whole items are left out from the end and replaced
# by their count and a hash of the whole name (+2~1a2b3c4d). A value is shown whole or not at
# all, so no cut reads as another number.
MAX_NAME = 200
LONG_FLOAT = 8  # a float spelled with more characters than this is rounded when names are long
VALUE_HASH_CHARS = 4


def short_value(value: str) -> str:
    """``/data/ckpt/ResNet20.pth`` -> ``ResNet20-3f2a9c1d``: readable and unique per value."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:HASH_CHARS]
    stem = PurePosixPath(value.strip("'\"").rstrip("/")).stem
    stem = re.sub(r"[^\w.+-]", "_", stem)[:40]  # no separators or shell-hostile characters
    return f"{stem}-{digest}" if stem else digest


def override_dirname(
    overrides: Iterable[str], exclude_keys: Iterable[str], item_sep: str = ",", kv_sep: str = "="
) -> str:
    """hydra._internal.config_loader_impl.get_overrides_dirname with path values shortened."""
    exclude = set(exclude_keys)
    lines = []
    for override in OverridesParser.create().parse_overrides([str(o) for o in overrides]):
        if override.key_or_group in exclude:
            continue
        line = override.input_line
        assert line is not None
        key, sep, value = line.partition("=")
        if sep and "/" in value:
            line = f"{key}={short_value(value)}"
        lines.append(line)
    lines.sort()
    items = [re.sub("[=]", kv_sep, line) for line in lines]
    return _fit(items, item_sep, kv_sep)


def _digest(text: str, chars: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def short_float(value: str) -> str:
    """``0.0017906784`` -> ``1.79e-3~0678``: three significant digits and a hash of the value as
    written, so two values that round alike still get two names; other values unchanged."""
    if len(value) <= LONG_FLOAT:
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and "e" not in value.lower() and "." not in value:
        return value  # a long integer is exact as written: not a float to round
    mantissa, _, exponent = f"{number:.2e}".partition("e")
    text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{text}~{_digest(value, VALUE_HASH_CHARS)}"


def _fit(items: list[str], item_sep: str, kv_sep: str) -> str:
    """``items`` joined, shortened to MAX_NAME bytes without cutting a key or a value."""
    name = item_sep.join(items)
    if len(name.encode()) <= MAX_NAME:
        return name
    digest = _digest(name, HASH_CHARS)
    rounded = []
    for item in items:
        key, sep, value = item.partition(kv_sep)
        rounded.append(f"{key}{sep}{short_float(value)}" if sep else item)
    shorter = item_sep.join(rounded)
    if len(shorter.encode()) <= MAX_NAME:
        return shorter
    for keep in range(len(rounded) - 1, -1, -1):
        tail = f"+{len(rounded) - keep}~{digest}"
        name = item_sep.join([*rounded[:keep], tail])
        if len(name.encode()) <= MAX_NAME:
            return name
    return f"+{len(rounded)}~{digest}"


def _resolve(overrides: Any, options: Any) -> str:
    return override_dirname(
        list(overrides),
        exclude_keys=list(options.get("exclude_keys") or []),
        item_sep=str(options.get("item_sep", ",")),
        kv_sep=str(options.get("kv_sep", "=")),
    )


def resolve(overrides: Any, options: Any) -> str:
    """``${mq.subdir:OVERRIDES,OVERRIDE_DIRNAME_OPTIONS}`` (conf/config.yaml's sweep subdir)."""
    return _resolve(overrides, options)


def checkpoint_tag(path: Any) -> str:
    """A short, stable, path-safe name for ``model.pretrained``: the run folder's name (or the
    file's stem) and 8 hex digits of the resolved path's sha256, e.g. ``resnet20-fp-sgdm-s0-
    1a2b3c4d``. An eval's folder carries it, so evaluations of different checkpoints never
    share (and overwrite) one folder."""
    if path is None or str(path) in ("", "None"):
        return "none"
    file = Path(str(path)).expanduser()
    if file.is_dir():
        file = file / "checkpoint.pt"
    resolved = file.resolve()
    stem = resolved.parent.name if resolved.stem == "checkpoint" else resolved.stem
    stem = re.sub(r"[^A-Za-z0-9_=+-]+", "_", stem).strip("_")[:60] or "ckpt"
    return f"{stem}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
