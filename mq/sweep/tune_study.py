"""The Optuna side of mq.sweep.tune: the storage, study names, telling a trial its value from its
run folder, and the record of a study that mq.results.report reads (tune.json)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mq.core.checkpoint import read_json
from mq.core.errors import ConfigError, first_line

NEVER_STARTED = "never started"  # asked, then the launch died before the trial had values


def storage_url(given: str | None, sweep_dir: Path) -> str:
    """The study's SQLAlchemy URL: ``given``, or an SQLite file in the sweep folder."""
    if given:
        return str(given)
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def shown(url: str) -> str:
    """``url`` without its password (logs and tune.json)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: the error says so elsewhere
        return url


def open_storage(url: str, sweep_dir: Path, default: bool) -> Any:
    """The RDB storage at ``url``; a ConfigError in one line when it cannot be opened (a bad
    URL, a missing driver, an unreachable server, a folder that does not exist)."""
    import optuna

    if default:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:
        raise ConfigError(
            f"hydra.sweeper.storage={shown(url)} cannot be opened: {first_line(exc)}"
        ) from None


def study_name(sweep_name: str, group: list[str]) -> str:
    return f"{sweep_name}:{' '.join(group) or 'all'}"


def _trial_handle(study: Any, frozen: Any) -> Any:
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


def reconcile(
    study: Any,
    point_of: Callable[[list[str]], Any],
    rebuild: Callable[[dict[str, Any]], list[str] | None],
) -> list[tuple[Any, Any]]:
    """Trials an earlier launch left RUNNING, each with its composed point (status from its
    folder), to be told, waited for or relaunched. A trial killed between being asked and
    recording its command is rebuilt from the values Optuna stored (``rebuild``); one that
    has not all its values is FAIL, marked ``never started`` (it does not use up budget)."""
    import optuna

    out = []
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        overrides = frozen.user_attrs.get("overrides") or rebuild(dict(frozen.params))
        handle = _trial_handle(study, frozen)
        if not overrides:
            handle.set_user_attr("status", NEVER_STARTED)
            study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
            continue
        point = point_of(list(overrides))
        handle.set_user_attr("overrides", list(overrides))
        handle.set_user_attr("run_dir", str(point.run_dir))
        out.append((handle, point))
    return out


def used(study: Any) -> int:
    """Trials that count against the budget (all but those that never started)."""
    return sum(t.user_attrs.get("status") != NEVER_STARTED for t in study.get_trials(False))


def tell(study: Any, trial: Any, run_dir: Path, objective: str) -> float | None:
    """Tell ``trial`` its value from ``run_dir/summary.json``; FAIL (with the run's status and
    error as user attributes) when the run failed, diverged or lacks the metric."""
    import optuna

    from mq.job.ledger import job_status

    summary = read_json(run_dir / "summary.json") or {}
    status = job_status(run_dir)  # "stopped", not "running", when its process was killed
    value = summary.get(objective)
    trial.set_user_attr("status", status)
    if status == "completed" and isinstance(value, (int, float)) and math.isfinite(value):
        study.tell(trial, float(value))
        return float(value)
    trial.set_user_attr("error", str(summary.get("error") or f"{objective} not in summary"))
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return None


def best_values(study: Any) -> dict[str, Any] | None:
    """The best completed trial's values (as trained: rounded), None without one."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return None
    return dict(study.best_trial.user_attrs.get("values") or study.best_trial.params)


def describe(study: Any, group: list[str]) -> dict[str, Any]:
    """A study for tune.json: every trial (number, state, value, values, status, folder)."""
    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "values": t.user_attrs.get("values", t.params),
            "status": t.user_attrs.get("status"),
            "run_dir": t.user_attrs.get("run_dir"),
        }
        for t in study.get_trials(deepcopy=False)
    ]
    return {
        "name": study.study_name,
        "group": group,
        "direction": study.direction.name.lower(),
        "trials": trials,
        "best": best_values(study),
    }
