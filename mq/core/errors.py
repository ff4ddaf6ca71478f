"""Errors that end a run with one clear line instead of a traceback."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration or input problem; its message is one line."""


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it (``__cause__``, else ``__context__``), in order."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def find_config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc``: Hydra's ``instantiate`` wraps constructor errors."""
    chain = exception_chain(exc)
    for seen in chain:
        if isinstance(seen, ConfigError):
            return seen
    # No ConfigError of ours: a constructor (torch's optimizers, nn.Linear) refusing a value.
    return next(filter(None, map(_constructor_error, chain)), None)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message for one-line reports (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _constructor_error(exc: BaseException) -> ConfigError | None:
    """A constructor's refusal of its arguments (``ValueError``/``TypeError`` under Hydra's
    InstantiationException), as one line naming the config node and the constructor's reason."""
    from hydra.errors import InstantiationException

    if not isinstance(exc, InstantiationException):
        return None
    cause = exc.__cause__
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if not isinstance(cause, (ValueError, TypeError)):
        return None  # not bad arguments: keep the traceback
    node = next(
        (ln.split(":", 1)[1].strip() for ln in str(exc).splitlines() if "full_key:" in ln), ""
    )
    target = next((ln for ln in str(exc).splitlines() if "target '" in ln), "")
    target = target.split("'")[1] if target.count("'") >= 2 else "its constructor"
    return ConfigError(f"{node or 'config'} could not be built ({target}): {first_line(cause)}")


def unknown_key_line(full_key: str, keys: list[str], prefix: str = "") -> str:
    """``KEY is not a config key``, with the closest key of its node or the ones allowed."""
    import difflib

    keys = [k for k in keys if k != "hydra" and not k.startswith("_")]
    key = full_key[len(prefix) :]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    allowed = ", ".join(keys) or f"none ({prefix.rstrip('.') or 'this node'} has no keys to set)"
    hint = f"did you mean {prefix}{close[0]}?" if close else f"allowed: {allowed}"
    return f"{full_key} is not a config key; {hint}"


def removed_key_line(full_key: str) -> str:
    """``~KEY`` on a key every run needs (conf/'s schemas name each one)."""
    return f"~{full_key} is not allowed: {full_key} is a required key; allowed: {full_key}=VALUE"


def hydra_error_line(exc: BaseException) -> str | None:
    """One line for an error Hydra raises while composing the config from the command line (a
    key typo, a value of the wrong type, a group without ``+``, bad override syntax); None for
    anything else."""
    from hydra.errors import (
        ConfigCompositionException,
        HydraException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        ConfigTypeError,
        ValidationError,
    )

    cause = exc.__cause__
    composing = isinstance(exc, ConfigCompositionException)
    if composing and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        key, full_key = getattr(cause, "key", None), getattr(cause, "full_key", None)
        parent = getattr(cause, "parent_node", None)
        keys = [str(k) for k in (parent.keys() if parent is not None else [])]
        prefix = full_key[: -len(str(key))] if full_key and key else ""
        return unknown_key_line(str(full_key), keys, prefix)
    if composing and isinstance(cause, ValidationError):
        return type_error_line(cause)
    if composing and isinstance(cause, ConfigTypeError) and "support deletion" in str(cause):
        return removed_key_line(str(getattr(cause, "full_key", None) or "?"))
    text = str(exc).strip()
    if "No match in the defaults list" in text:
        key = text.split("'")[1] if text.count("'") >= 2 else "?"
        plus = next((w for w in text.split() if w.startswith("+")), f"+{key}=NAME")
        what = "a preset" if key == "sweep" else "a group that is not in the defaults list"
        return f"{key} is {what}: use {plus}"
    if isinstance(exc, MissingConfigException) and "Available options in" in text:
        missing = text.split("'")[3] if text.count("'") >= 4 else "?"  # 'group/option'
        group, _, option = missing.rpartition("/")
        block = text.split("Available options in", 1)[1].split("Config search path")[0]
        options = [ln.strip() for ln in block.splitlines()[1:] if ln.strip()]
        return f"{group}={option} is not known; allowed: {', '.join(options)}"
    if text.startswith("Ambiguous value for argument"):  # key=a,b without -m
        arg = text.split("'")[1] if text.count("'") >= 2 else "key=a,b"
        return f"{arg} is a sweep: add -m (or key=[a,b] for a list, key='a,b' for a string)"
    if text.startswith("Sweep parameters") and "requires --multirun" in text:
        arg = text.split("'")[1] if text.count("'") >= 2 else "key=..."
        return f"{arg} is a sweep: add -m"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the command line: {first_line(exc)} (Hydra's override grammar)"
    if isinstance(exc, HydraException):
        return "; ".join(line.strip().rstrip(".") for line in text.splitlines() if line.strip())
    return None


# What a typed key takes, by the name OmegaConf gives its type in a ValidationError.
TYPES = {
    "bool": "true, false (also yes, no, on, off, 1, 0)",
    "Integer": "an integer",
    "Float": "a number",
    "String": "a string",
}
CONVERSION = (
    r"Value '(?P<value>.*?)' of type '.*?' could not be converted to (?P<type>\w+)",
    r"Value '(?P<value>.*?)' is not a valid (?P<type>bool)",
)


def type_error_line(exc: BaseException) -> str:
    """``KEY=VALUE is not allowed; allowed: WHAT`` for a value OmegaConf could not convert to
    its key's type (conf/'s schemas, mq/cli/schema.py)."""
    import re

    text = first_line(exc)
    full_key = getattr(exc, "full_key", None) or "?"
    found = next(filter(None, (re.match(p, text) for p in CONVERSION)), None)
    if found is not None:
        value = {"True": "true", "False": "false"}.get(found["value"], found["value"])
        allowed = TYPES.get(found["type"], found["type"])
        return f"{full_key}={value} is not allowed; allowed: {allowed}"
    if "is not Optional" in text:  # null for a key that must have a value
        kind = _field_type(getattr(exc, "object_type", None), str(getattr(exc, "key", "")))
        return f"{full_key}=null is not allowed; allowed: {TYPES.get(kind, 'a value')}"
    return f"{full_key}: {text}"


def _field_type(schema: Any, key: str) -> str:
    """The name TYPES knows a schema field's type by ("Integer", ...), or ""."""
    import dataclasses
    import typing

    if not dataclasses.is_dataclass(schema):
        return ""
    kind = typing.get_type_hints(schema).get(key)
    return {int: "Integer", float: "Float", bool: "bool", str: "String"}.get(kind, "")
