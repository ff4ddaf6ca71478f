"""Numbers with what they stand on: every table of mq.report says what it averaged and marks
limited runs; one configuration has one number in every table of a report; the report's
default number is the one python -m mq.runs lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMOKE, launch, start_launch
from test_report import make_run

from mq.results.report import write_report
from mq.results.runs import listing

LIMITED = {
    "limit_test_batches": 16,
    "limit_train_batches": 10,
    "test_images": 2000,
    "test_images_total": 10000,
    "train_batches": 10,
    "train_batches_total": 375,
}


def limit(run_dir: Path) -> Path:
    """Mark a run limited, and give its summary the keys a real one has."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    last10 = summary["test_acc"][-10:]
    summary |= {"last10_mean_test_acc": sum(last10) / len(last10), "last10_epochs": len(last10)}
    path.write_text(json.dumps(summary | LIMITED))
    return run_dir


def tuned_sweep(root: Path) -> Path:
    """A tuned sweep as hydra/sweeper=tune leaves it: one-epoch limited trials (seed 0) and
    final runs (seeds 1, 2) of the best (tuned) and the default configuration per study."""
    final = []

    def add(study: str, kind: str, run_dir: Path) -> None:
        final.append({"study": study, "kind": kind, "run_dir": f"x/{run_dir.name}"})

    # STE: trials lr=0.01 (the best) and lr=0.1; the tuned final runs repeat lr=0.01.
    limit(make_run(root, "ste", 0, [11.0], lr=0.01))
    limit(make_run(root, "ste", 0, [5.0], lr=0.1))
    for seed, acc in ((1, 11.5), (2, 11.44)):
        add("s:meta=ste", "tuned", limit(make_run(root, "ste", seed, [acc], lr=0.01)))
        add("s:meta=ste", "default", limit(make_run(root, "ste", seed, [acc - 1], lr=0.001)))
    # MultiFC: trials hidden_size=50 and 100 (the default, and the best)
    limit(make_run(root, "multifc", 0, [12.0], hidden_size=50))
    limit(make_run(root, "multifc", 0, [13.0], hidden_size=100, lr=0.002))
    for seed, acc in ((1, 13.0), (2, 13.5)):
        add("s:meta=multifc", "tuned", limit(make_run(root, "multifc", seed, [acc], lr=0.002)))
        add("s:meta=multifc", "default", limit(make_run(root, "multifc", seed, [acc - 2])))
    studies = [
        {
            "name": f"s:meta={meta}",
            "group": [f"meta={meta}", "optimizer=sgd"],
            "direction": "maximize",
            "trials": [{"number": 0, "state": "COMPLETE", "value": 40.0, "values": {}}],
            "best": {"optimizer.lr": 0.01},
        }
        for meta in ("ste", "multifc")
    ]
    tune = {"objective": "best_val_acc", "trials_per_study": 2, "final_seeds": [1, 2]}
    tune |= {"studies": studies, "final": final, "storage": "sqlite:///x"}
    (root / "tune.json").write_text(json.dumps(tune))
    return root


def test_every_table_of_a_tuned_sweep_marks_limited_runs_and_says_what_it_averaged(tmp_path):
    text = write_report(tuned_sweep(tmp_path / "s"), plots=False).read_text()
    fair, generic = text.split("# Report:")
    assert "last-10-epoch mean" not in text and "last 10 epochs" not in text
    assert "each run's final test accuracy (its last epoch, of 1)" in fair
    assert "each run's final test accuracy (its last epoch, of 1)" in generic
    note = (
        "* limited run: tested on 2,000 of 10,000 images; trained on 10 of 375 batches per "
        "epoch; not comparable with a full run"
    )
    assert note in fair and note in generic
    (ste,) = [ln for ln in fair.splitlines() if ln.startswith("| meta=ste |")]
    assert "| 10.47 (0.04) n=2 * |" in ste and "| 11.47 (0.04) n=2 * |" in ste


def test_one_configuration_has_one_number_in_a_tuned_report(tmp_path):
    text = write_report(tuned_sweep(tmp_path / "s"), plots=False).read_text()
    generic = text.split("# Report:")[1]
    main = generic.split("## Beside the paper")[0]  # the paper's table lists cells again
    table = [ln for ln in main.splitlines() if ln.startswith("| resnet20 ")]
    # The tuned STE config (lr=0.01): its final runs as in the fair table, its trial apart.
    (final,) = [ln for ln in table if "| 0.01 | final |" in ln]
    (trial,) = [ln for ln in table if "| 0.01 | trial |" in ln]
    assert "11.47 (0.04) n=2 *" in final and "11.00 (-) n=1 *" in trial
    assert "n=3" not in generic
    # A meta key names itself: never a bare "lr" or "hidden_size" beside optimizer.lr.
    header = next(ln for ln in generic.splitlines() if ln.startswith("| model |"))
    assert "| optimizer.lr | tuning |" in header
    assert "multifc (meta.net.hidden_size=50)" in header and "(hidden_size=" not in header
    # Only what the sweep defined can be missing: no cross product of trial values.
    missing = generic.split("## Missing or incomplete")[1]
    assert "no runs:" not in missing and "fewer seeds" not in missing
    assert "Nothing: every cell is complete." in missing


def test_a_missing_final_run_is_listed(tmp_path):
    sweep = tuned_sweep(tmp_path / "s")
    tune = json.loads((sweep / "tune.json").read_text())
    tune["final"].append(
        {"study": "s:meta=ste", "kind": "tuned", "run_dir": "x/gone", "overrides": ["seed=3"]}
    )
    (sweep / "tune.json").write_text(json.dumps(tune))
    missing = write_report(sweep, plots=False).read_text().split("## Missing or incomplete")[1]
    assert "no runs: final run (tuned) seed=3" in missing


def test_the_report_default_is_the_final_accuracy_mq_runs_lists(tmp_path):
    sweep = tmp_path / "s"
    make_run(sweep, "ste", 0, [10.9, 27.5])
    ((status, epochs, final, *_),) = listing(sweep)
    assert (status, epochs, final) == ("completed", "2/2", "27.50")
    text = write_report(sweep, tmp_path / "out", plots=False).read_text()
    assert "| 27.50 (-) n=1 |" in text and "each run's final test accuracy" in text
    text = write_report(sweep, tmp_path / "out", last=10, plots=False).read_text()
    assert "| 19.20 (-) n=1 |" in text and "over its last 2 of 2 epochs" in text


@pytest.mark.slow
def test_two_concurrent_launches_of_one_sweep_both_exit_0_when_every_job_completed(tmp_path):
    """The second launch finds a job's folder locked by the first: it waits for that job and
    counts its result instead of calling it failed."""
    args = ["-m", *SMOKE, "meta=ste", "seed=0,1", "sweep_name=both"]
    first, second = start_launch(*args, cwd=tmp_path), start_launch(*args, cwd=tmp_path)
    outs = [p.communicate(timeout=300) for p in (first, second)]
    for proc, (out, err) in zip((first, second), outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "failed: " not in err and "0 failed" in out + err
    assert any("completed by another launch of this sweep" in o + e for o, e in outs)
    runs = [r for r in (tmp_path / "outputs/sweeps/both").iterdir() if r.is_dir()]
    statuses = [json.loads((r / "summary.json").read_text())["status"] for r in runs]
    assert statuses == ["completed", "completed"]


def test_a_sweep_without_a_name_is_named_from_what_it_sweeps():
    from mq.cli.conf import exclude_keys
    from mq.sweep.sweepname import sweep_name

    def name(*task: str, hydra: tuple[str, ...] = ()) -> str:
        return sweep_name(list(task), list(hydra), exclude_keys())

    one = name("meta=ste,multifc", "bits=1,2", "epochs=1", "logger=none")
    assert one.startswith("bits=1,2+meta=ste,multifc-") and len(one) < 100
    # the same sweep, spelled in another order or with keys that change no result: same name
    assert name("epochs=1", "progress=false", "bits=1,2", "meta=ste,multifc") == one
    # any other override, swept or fixed: another sweep
    assert name("meta=ste,multifc", "bits=1,2", "epochs=2") != one
    assert name("meta=ste,multifc", "bits=1,3", "epochs=1") != one
    tune = ("hydra/sweeper=tune", "hydra.sweeper.space=[]", "hydra.launcher.cpus_per_task=2")
    assert name("meta=ste", hydra=tune) != name("meta=ste")
    more = (*tune, "hydra.sweeper.trials=9")  # a relaunch with a larger budget: the same study
    assert name("meta=ste", hydra=more) == name("meta=ste", hydra=tune)
    assert name("meta=glob(*)").startswith("meta=glob_x_-")
    from mq.job.rundir import check_name

    check_name("sweep_name", one)  # a valid folder name


@pytest.mark.slow
def test_unnamed_sweeps_get_their_own_folders_and_a_relaunch_finds_its_own(tmp_path):
    first = launch("-m", *SMOKE, "meta=ste", "seed=0", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (first_dir,) = (tmp_path / "outputs/sweeps").iterdir()
    other = launch("-m", *SMOKE, "meta=ste", "seed=1", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    sweeps = sorted(p for p in (tmp_path / "outputs/sweeps").iterdir())
    assert len(sweeps) == 2 and "adhoc" not in str(sweeps)
    groups = {json.loads((s / "sweep.json").read_text())["group"] for s in sweeps}
    assert len(groups) == 2  # one wandb group each
    for sweep in sweeps:
        assert len(json.loads((sweep / "sweep.json").read_text())["launches"]) == 1
    # the first command again (reordered): its own folder, its completed job skipped
    again = launch("-m", "seed=0", "meta=ste", *SMOKE, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "launching 0, skipping 1" in again.stdout + again.stderr
    assert sorted(p for p in (tmp_path / "outputs/sweeps").iterdir()) == sweeps
    # a sweep launched into the earlier default folder (adhoc) by the same command: found there
    legacy = tmp_path / "outputs/sweeps/adhoc"
    (other_dir,) = [s for s in sweeps if s != first_dir]
    other_dir.rename(legacy)
    again = launch("-m", *SMOKE, "meta=ste", "seed=1", cwd=tmp_path)
    assert "launching 0, skipping 1" in again.stdout + again.stderr, again.stderr[-3000:]
    assert not other_dir.exists()
