"""Path-safe sweep folder names: Hydra's ``job.override_dirname``, except that a value holding a
``/`` (a path) becomes its last component's stem plus a hash of the whole value.

Hydra's own name puts a path value in the folder name as written, so
``model.pretrained=/abs/ckpt/x.pth`` nests folders (hydra#1832, #3018) and makes a 190-character
wandb run name. ``conf/config.yaml`` builds the sweep subdir with ``${mq.subdir:...}`` instead:
``model.pretrained=x-1a2b3c4d``; two different paths never share a folder (the hash is of the
value as written), and every name without a path is byte for byte Hydra's, so sweeps launched
before keep finding their completed jobs.

The resolver is registered by ``mq.conf.register_resolvers()``: launch.py calls it before Hydra
starts, and each submitit job (mq.sweep.launcher.SubmititJob) before Hydra resolves its folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

RESOLVER = "mq.subdir"
HASH_CHARS = 8
# File systems refuse names over 255 bytes (ENAMETOOLONG); a longer name (a tuning trial with
# many keys) keeps its first MAX_NAME characters and a hash of the whole name.
MAX_NAME = 200


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
    name = re.sub(pattern="[=]", repl=kv_sep, string=item_sep.join(lines))
    if len(name.encode()) > MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
        name = f"{name.encode()[:MAX_NAME].decode(errors='ignore')}-{digest}"
    return name


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
