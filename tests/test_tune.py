"""Hyperparameter studies (hydra/sweeper=tune, mq/sweep/tune.py): search spaces, objectives and
storages checked before anything is submitted, one line and exit code 2 for each bad input;
a local study end to end (resumed by a relaunch, failed trials recorded, final runs)."""

from __future__ import annotations

import json

import optuna
import pytest
from conftest import SMOKE, launch

from mq.core.errors import ConfigError
from mq.sweep.tune_space import check_objective, parse_dist, space_for
from mq.sweep.tune_study import open_storage

LR = "{optimizer.lr: {type: float, low: 1e-4, high: 1e-1, log: true}}"
TUNE = [*SMOKE, "meta=ste", "hydra/sweeper=tune", "dataset.val_size=64", "sweep_name=study"]


def space(params: str = LR) -> str:
    return f"hydra.sweeper.space=[{{params: {params}}}]"


def test_spaces_rules_and_distributions():
    rules = [
        {"params": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}},
        {
            "when": {"meta": "multifc"},
            "params": {"meta.lr": {"type": "float", "low": 1, "high": 2}},
        },
        {
            "when": {"optimizer": "sgdm"},
            "params": {"optimizer.momentum": {"type": "categorical", "choices": [0.5, 0.9]}},
        },
    ]
    assert set(space_for(rules, {"meta": "ste", "optimizer": "sgd"})) == {"optimizer.lr"}
    both = space_for(rules, {"meta": "multifc", "optimizer": "sgdm"})
    assert set(both) == {"optimizer.lr", "meta.lr", "optimizer.momentum"}
    assert both["optimizer.momentum"].corners() == [0.5, 0.9]
    with pytest.raises(ConfigError, match="type=gauss is not known; allowed: float, int, categ"):
        parse_dist("optimizer.lr", {"type": "gauss", "low": 0, "high": 1})
    with pytest.raises(ConfigError, match="low=0.1, high=0.01 is not allowed"):
        parse_dist("optimizer.lr", {"type": "float", "low": 0.1, "high": 0.01})
    with pytest.raises(ConfigError, match="low > 0"):
        parse_dist("optimizer.lr", {"type": "float", "low": 0, "high": 1, "log": True})
    with pytest.raises(ConfigError, match="the search space is empty for meta=ste"):
        space_for(rules[1:2], {"meta": "ste"})


def test_objectives_are_validation_metrics_with_their_direction():
    assert check_objective("best_val_acc") == "maximize"
    assert check_objective("final_val_loss") == "minimize"
    with pytest.raises(ConfigError, match="val_accuracy is not a metric runs produce"):
        check_objective("val_accuracy")
    with pytest.raises(ConfigError, match="does not fit best_val_acc; allowed: maximize"):
        check_objective("best_val_acc", "minimize")


def test_storage_that_cannot_be_opened_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"storage=sqlite:////nonexistent/x.db cannot be opened"):
        open_storage("sqlite:////nonexistent/x.db", tmp_path, default=False)
    with pytest.raises(ConfigError, match=r"postgresql://u:\*\*\*@127.0.0.1:1/db cannot be"):
        open_storage("postgresql://u:secret@127.0.0.1:1/db", tmp_path, default=False)
    storage = open_storage(f"sqlite:///{tmp_path}/s.db", tmp_path, default=False)
    optuna.create_study(storage=storage, study_name="x")  # a real database file
    assert (tmp_path / "s.db").stat().st_size > 0


BAD = {
    "unknown key": (
        [space("{optimizer.momentm: {type: float, low: 0.1, high: 0.9}}")],
        "error: search space key optimizer.momentm is not a config key of the study",
    ),
    "unknown distribution": (
        [space("{optimizer.lr: {type: gauss, low: 0.1, high: 0.9}}")],
        "error: search space key optimizer.lr: type=gauss is not known; allowed: float",
    ),
    "objective runs do not produce": (
        [space(), "hydra.sweeper.objective=best_test_acc"],
        "error: hydra.sweeper.objective=best_test_acc is not a metric runs produce; the test",
    ),
    "unreachable storage": (
        [space(), "hydra.sweeper.storage=sqlite:////nonexistent/dir/study.db"],
        "error: hydra.sweeper.storage=sqlite:////nonexistent/dir/study.db cannot be opened",
    ),
    "val_size larger than the training set": (
        [space(), "dataset.val_size=1000"],
        "dataset.val_size=1000 is too large: the training set has 512 images",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_anything_is_submitted(tmp_path, case):
    args, message = BAD[case]
    result = launch(*TUNE, *args, "-m", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert message in lines[0]
    assert not (tmp_path / "outputs").exists()  # no study, no folder, no job


@pytest.mark.slow
def test_local_study_resumes_without_repeating_trials(tmp_path):
    args = ["-m", *TUNE, space(), "hydra.sweeper.parallel=2", "hydra.sweeper.final_seeds=[1,2]"]
    first = launch(*args, "hydra.sweeper.trials=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "outputs/sweeps/study"
    assert (sweep / "study.db").is_file()
    again = launch(*args, "hydra.sweeper.trials=3", cwd=tmp_path)  # one more trial
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="study:all", storage=f"sqlite:///{sweep}/study.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    dirs = [t.user_attrs["run_dir"] for t in study.trials]
    assert len(set(dirs)) == 3
    for t in study.trials:  # the study's value is the run's own validation metric
        summary = json.loads((tmp_path / t.user_attrs["run_dir"] / "summary.json").read_text())
        assert t.value == summary["best_val_acc"] and summary["status"] == "completed"
    assert "trial 2" in again.stdout and "trial 0" not in again.stdout
    # what ran, said truly: trials count, and each trial's value is logged when it ends
    assert "sweep done: 6 jobs ran (2 trials, 4 final runs), 0 failed" in first.stdout
    assert "sweep done: 1 jobs ran (1 trials, 0 final runs), 0 failed" in again.stdout
    value = study.trials[2].value
    assert f"trial 2 ended: best_val_acc = {value:.4g}" in again.stdout
    tune = json.loads((sweep / "tune.json").read_text())
    kinds = sorted((f["kind"], f["seed"]) for f in tune["final"])
    assert kinds == [("default", 1), ("default", 2), ("tuned", 1), ("tuned", 2)]
