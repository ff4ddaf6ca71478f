"""Search spaces and objectives of a hyperparameter study (mq.sweep.tune), checked before
anything is submitted.

A space is a list of rules in YAML (``hydra.sweeper.space``); each rule's ``params`` apply to the
studies whose config choices match its ``when`` (all of them when it has none; a later rule
overrides an earlier one for the same key), so one preset can give STE, MultiFC and each
optimizer their own ranges::

    space:
      - params: {optimizer.lr: {type: float, low: 1e-4, high: 1e-1, log: true}}
      - when: {optimizer: sgdm}
        params: {optimizer.momentum: {type: float, low: 0.5, high: 0.99}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mq.core.errors import ConfigError

# The objective is read from each trial's summary.json: validation metrics only (model
# selection on the test set is what the protocol exists to prevent); the direction follows.
OBJECTIVES = {
    "final_val_acc": "maximize",
    "best_val_acc": "maximize",
    "last10_mean_val_acc": "maximize",
    "final_val_loss": "minimize",
    "best_val_loss": "minimize",
    "last10_mean_val_loss": "minimize",
}
TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Dist:
    """One key's distribution."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any, key: str) -> Any:
        if self.type == "float":
            return trial.suggest_float(key, self.low, self.high, log=self.log)
        if self.type == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(key, list(self.choices))

    def corners(self) -> list[Any]:
        """The values that bound the space (each is composed and checked up front)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [self.low, self.high]


def parse_dist(key: str, spec: Any) -> Dist:
    """A ``{type: float, low: .., high: .., log: ..}`` mapping as a Dist, or a one-line error."""
    where = f"search space key {key}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: {spec!r} is not a distribution; allowed: a mapping with type")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type={kind} is not known; allowed: {', '.join(TYPES)}")
    allowed = {"type", "low", "high", "log"} if kind != "categorical" else {"type", "choices"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(
            f"{where}: {extra[0]} is not allowed for type={kind}; allowed: "
            f"{', '.join(sorted(allowed))}"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(f"{where}: categorical needs choices: a non-empty list")
        return Dist(kind, choices=tuple(choices))
    low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not low < high or (log and low <= 0):  # type: ignore[operator]
        raise ConfigError(
            f"{where}: low={low}, high={high} is not allowed; allowed: numbers with low < high"
            + (" and low > 0 (log)" if log else "")
        )
    return Dist(kind, float(low), float(high), log)  # type: ignore[arg-type]


def space_for(rules: list[Any] | None, choices: Mapping[str, str]) -> dict[str, Dist]:
    """The keys and distributions of the study whose config choices are ``choices``."""
    out: dict[str, Dist] = {}
    for i, rule in enumerate(rules or []):
        if not isinstance(rule, Mapping) or not set(rule) <= {"when", "params"}:
            raise ConfigError(
                f"hydra.sweeper.space[{i}] is not allowed; allowed: a mapping with when, params"
            )
        when = rule.get("when") or {}
        if all(str(choices.get(str(k))) == str(v) for k, v in when.items()):
            for key, spec in (rule.get("params") or {}).items():
                out[str(key)] = parse_dist(str(key), spec)
    if not out:
        raise ConfigError(
            f"the search space is empty for {' '.join(f'{k}={v}' for k, v in choices.items())}; "
            "add a rule to hydra.sweeper.space"
        )
    return out


def check_objective(objective: str, direction: str | None = None) -> str:
    """The objective's direction; an error for a metric runs do not produce or the test set."""
    if objective not in OBJECTIVES:
        why = "the test set is never an objective; " if "test" in objective else ""
        raise ConfigError(
            f"hydra.sweeper.objective={objective} is not a metric runs produce; {why}allowed: "
            f"{', '.join(OBJECTIVES)}"
        )
    if direction not in (None, OBJECTIVES[objective]):
        raise ConfigError(
            f"hydra.sweeper.direction={direction} does not fit {objective}; allowed: "
            f"{OBJECTIVES[objective]}"
        )
    return OBJECTIVES[objective]


def override_value(value: Any) -> str:
    """A sampled value as a command-line override: floats to 4 significant digits, so trial
    folders have short names (the rounded value is what the trial trains with and records)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rounded(dist: Dist, value: Any) -> Any:
    return float(override_value(value)) if dist.type == "float" else value
