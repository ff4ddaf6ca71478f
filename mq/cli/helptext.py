"""``python launch.py --help``, written from conf/ itself: every group with its options (each
option's first comment line) and every key with its default and its comment, so the help never
lists an option or a key that conf/ does not have, nor misses a new one.

conf/hydra/help/mq.yaml's template reads it through the ``${mq.help:}`` resolver
(``mq.cli.resolvers.register_resolvers``). Free of torch: --help is quick.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mq.cli.conf import CONF, groups, options
from mq.core.keys import flatten

RESOLVER = "mq.help"
# key: value  # comment   (value and comment optional; a key line ends a pending comment block)
LINE = re.compile(r"^(?P<indent> *)(?P<key>[\w.]+):(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")


def _comments(path: Path) -> dict[str, tuple[str, str]]:
    """dotted key -> (value as written, comment) from a YAML file's lines; a key's comment is
    its inline one, else the comment lines right above it."""
    out: dict[str, tuple[str, str]] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    above: list[str] = []
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = LINE.match(raw)
        if not match or stripped.startswith("-"):
            above = [] if not stripped.startswith("-") else above
            continue
        indent, key = len(match["indent"]), match["key"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value = match["value"].strip()
        out[".".join([*(k for _, k in stack), key])] = (value, match["comment"] or " ".join(above))
        above = []
        if not value:  # a mapping or a list opens
            stack.append((indent, key))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return f"[{', '.join(map(_shown, value))}]"
    return {None: "null", True: "true", False: "false"}.get(value, str(value))  # type: ignore


def keys(path: Path) -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) for each key a YAML file sets, in file order, with the
    keys of the files its defaults list merges in here (``base/x@_here_``) first. Hydra's own
    entries (defaults, _target_, hydra) are left out."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(data, dict)
    out = []
    for entry in data.pop("defaults", None) or []:
        # /schema/...: a ConfigStore schema (mq.cli.schema), types only, no file
        if isinstance(entry, str) and entry.endswith("@_here_") and not entry.startswith("/"):
            out += keys(path.parent / f"{entry.removesuffix('@_here_')}.yaml")
    comments = _comments(path)
    for key, value in flatten(data).items():
        if key.split(".")[0] == "hydra" or any(p.startswith("_") for p in key.split(".")):
            continue
        written, comment = comments.get(key, ("", ""))
        out.append(
            (key, written if written and not isinstance(value, list) else _shown(value), comment)
        )
    return out


def _package_global(path: Path) -> bool:
    return path.read_text().startswith("# @package _global_")


def description(path: Path) -> str:
    """An option's first comment line (what the file says it is), after any @package line."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
    first = next(iter(lines), "")
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def _default_choices() -> dict[str, str]:
    config = OmegaConf.load(CONF / "config.yaml")
    choices = {}
    for entry in config.get("defaults", []):
        if isinstance(entry, str) or not entry:
            continue
        ((group, option),) = entry.items()
        choices[str(group)] = str(option)
    return choices


WIDE = 40  # a longer KEY=VALUE gets its comment on the next line


def _key_lines(entries: list[tuple[str, str, str]], prefix: str, indent: str) -> list[str]:
    pairs = [(f"{prefix}{k}={v}", c) for k, v, c in entries]
    width = max((len(p) for p, _ in pairs if len(p) <= WIDE), default=0)
    lines = []
    for pair, comment in pairs:
        if len(pair) > WIDE and comment:
            lines += [f"{indent}{pair}", f"{indent}{'':<{width}}  {comment}"]
        else:
            lines.append(f"{indent}{pair:<{width}}  {comment}".rstrip())
    return lines


def text() -> str:
    """The whole help text (groups, their options and keys, the top-level keys)."""
    defaults = _default_choices()
    lines = [
        "mq: MetaQuant quantization-aware training, configured by Hydra (conf/).",
        "",
        "  python launch.py [GROUP=OPTION ...] [KEY=VALUE ...]      one run",
        "  python launch.py -m GROUP=A,B KEY='range(1,3)' ...       a sweep (glob(), choice() too)",
        "  python launch.py -m +sweep=PRESET                         a preset of sweeps/",
        "",
        "Groups (GROUP=OPTION; * is the default) and the keys each option adds:",
    ]
    for group in groups():
        lines.append(f"  {group}:")
        for option in options(group):
            path = CONF / group / f"{option}.yaml"
            mark = "*" if defaults.get(group) == option else " "
            lines.append(f"   {mark}{option:<15} {description(path)}".rstrip())
            prefix = "" if _package_global(path) else f"{group}."  # task/: keys of the root
            lines += _key_lines(keys(path), prefix, "        ")
    presets = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
    lines += ["", f"Sweep presets (-m +sweep=NAME): {', '.join(presets)}", ""]
    lines.append("Keys (KEY=VALUE, shown with their defaults):")
    lines += _key_lines(keys(CONF / "config.yaml"), "", "  ")
    lines += [
        "",
        "python launch.py --cfg job [OVERRIDES] prints the composed config; shell completion of",
        'groups, options and keys: eval "$(python launch.py -sc install=bash)" (README).',
    ]
    return "\n".join(lines).replace("$", "$$")  # Hydra fills the template with string.Template
