"""The tuned comparison's report (mq/results/fair_report.py, mq/results/stats.py): Welch's test
against known values, and tuned vs tuned next to defaults vs defaults from a sweep's tune.json."""

from __future__ import annotations

import json
import math

from mq.results.report import write_report
from mq.results.stats import t_cdf, t_quantile, welch


def test_t_distribution_and_welch_against_reference_values():
    # R: pt(2, 5) = 0.9490303; qt(0.975, 4) = 2.776445; t.test(a, b) (Welch) below
    assert math.isclose(t_cdf(2.0, 5), 0.9490303, abs_tol=1e-6)
    assert math.isclose(t_quantile(0.975, 4), 2.776445, abs_tol=1e-5)
    c = welch([1, 2, 3, 4], [2, 4, 6, 8.5])
    assert c is not None
    assert math.isclose(c.df, 4.2363, abs_tol=1e-3)
    assert math.isclose(c.p, 0.1579, abs_tol=1e-3)
    assert c.low < c.diff < c.high and math.isclose(c.diff, -2.625)
    assert welch([1.0], [2.0, 3.0]) is None  # no variance with one seed


def _run(sweep, name, acc, config):
    d = sweep / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(config)
    summary = {
        "status": "completed",
        "last10_mean_test_acc": acc,
        "final_test_acc": acc,
        "best_test_acc": acc,
        "test_acc": [acc],
        "epochs_completed": 1,
        "choices": {},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return name


def test_report_prints_tuned_vs_tuned_next_to_defaults(tmp_path):
    sweep = tmp_path / "sweep"
    final, studies = [], []
    accs = {
        ("ste", "default"): [50, 52, 51],
        ("ste", "tuned"): [70, 71, 69],
        ("multifc", "default"): [60, 61, 62],
        ("multifc", "tuned"): [70, 72, 71],
    }
    for (meta, kind), values in accs.items():
        for seed, acc in enumerate(values, 1):
            cfg = f"meta: {{name: {meta}}}\nseed: {seed}\nkind: {kind}\n"
            name = _run(sweep, f"meta={meta},kind={kind},seed={seed}", acc, cfg)
            final.append(
                {
                    "study": f"s:meta={meta}",
                    "kind": kind,
                    "seed": seed,
                    "run_dir": f"outputs/sweeps/s/{name}",
                }
            )
    for meta in ("ste", "multifc"):
        trials = [
            {"number": i, "state": s, "value": v, "values": {"optimizer.lr": 0.01}}
            for i, (s, v) in enumerate([("COMPLETE", 60.0), ("FAIL", None), ("COMPLETE", 65.0)])
        ]
        studies.append(
            {
                "name": f"s:meta={meta}",
                "group": [f"meta={meta}", "optimizer=sgd"],
                "direction": "maximize",
                "trials": trials,
                "best": {"optimizer.lr": 0.01},
            }
        )
    tune = {
        "objective": "best_val_acc",
        "trials_per_study": 3,
        "final_seeds": [1, 2, 3],
        "studies": studies,
        "final": final,
        "storage": "sqlite:///x",
    }
    (sweep / "tune.json").write_text(json.dumps(tune))
    text = write_report(sweep).read_text()
    assert "## Tuned vs tuned, defaults vs defaults" in text
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| meta=")
    }
    assert "51.00 (1.00) n=3" in rows["meta=ste"] and "70.00 (1.00) n=3" in rows["meta=ste"]
    # MultiFC: +10 over STE at defaults, +1 over the best tuned STE, each with CI and p
    assert "+10.00 [" in rows["meta=multifc"] and "+1.00 [" in rows["meta=multifc"]
    assert "best val" in text and "| 65.00 |" in rows["meta=ste"]
    assert "failed or diverged: 2" in text
    assert (sweep / "report" / "study_meta=ste.png").is_file()
