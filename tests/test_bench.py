"""python -m mq.bench end to end, at a tiny size: the table, the JSON and what they promise."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from mq.cli.conf import options


@pytest.mark.slow  # runs every benchmark once (about 20 s)
def test_bench_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    args = "--nets ste,multifc --quants dorefa --warmup 1 --steps 2 --rounds 2 --batch 32"
    args += " --images 256 --epoch-batches 4 --threads 1 --no-compile"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "mq.bench", *args.split(), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "100ep min" in result.stdout and "dorefa/multifc" in result.stdout
    data = json.loads(out.read_text())
    names = ["fp", "dorefa/ste", "dorefa/multifc"]
    assert [v["name"] for v in data["variants"]] == names
    for name in names:
        step = data["steps"][name]
        assert step["n"] == 4 and 0 < step["q1"] <= step["ms"] <= step["q3"]
        epoch = data["epochs"][name]
        assert epoch["images_per_s"] > 0 and epoch["peak_mb"] > 0
        # 100 epochs of the 256 training images at the measured rate, in minutes
        expected = 100 * 256 / epoch["images_per_s"] / 60
        assert abs(epoch["projected_100_epochs_min"] - expected) < 1e-9 * expected
    assert data["epochs"]["data"]["ms_per_batch"] > 0
    # kernel-running ops per step: the quantizer over all layers adds a few dozen, not one set
    # per layer (ResNet20 has 22 quantized layers; layer by layer it added ~400 here)
    ops = {name: data["steps"][name]["ops"] for name in names}
    assert 0 < ops["fp"] < ops["dorefa/ste"] < ops["fp"] + 100, ops
    assert ops["dorefa/ste"] < ops["dorefa/multifc"] < ops["fp"] + 200, ops


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nets", "ste,foo"], "--nets foo is not known; allowed: ste, "),
        (["--quants", "xnor"], "--quants xnor is not known; allowed: "),
        (["--model", "vgg"], "--model vgg is not known; allowed: resnet20"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--pack", "1,0"], "--pack 1,0 is not a list of pack sizes; allowed: e.g. 1,2,4,8,16"),
        (["--pack", "2", "--pack-net", "foo"], "--pack-net foo is not known; allowed: "),
    ],
)
def test_bench_bad_arguments_exit_with_one_line(args, message, capsys):
    from mq.tools.bench import parse

    with pytest.raises(SystemExit) as exit_info:
        parse(args)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert message in line
    group = {"--nets": "meta", "--quants": "quant"}.get(args[0])
    if group:  # the options of conf/<group>/ (no "none": the FP variant is always run)
        assert set(line.split("allowed: ")[1].split(", ")) == set(options(group)) - {"none"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_bench_cuda_without_a_gpu_is_a_clear_error(capsys):
    from mq.tools.bench import parse

    with pytest.raises(SystemExit):
        parse(["--device", "cuda"])
    assert "no CUDA device is available here" in capsys.readouterr().err


def test_every_bench_option_has_a_help_text(monkeypatch):
    from mq.tools.bench import parse

    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    parse(["--quick"])
    (parser,) = parsers
    assert [a.option_strings for a in parser._actions if not a.help] == []


def test_bench_pack_times_each_mode_with_its_runs(tmp_path):
    """K runs in one process (fused, one by one), K processes of one run each, one alone."""
    from mq.tools.bench_pack import main  # python -m mq.bench's entry

    out = tmp_path / "pack.json"
    args = ["--pack", "1,2", "--batch", "4", "--steps", "1", "--warmup", "0"]
    main([*args, "--pack-net", "ste", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["k"], r["mode"]) for r in rows] == [
        (1, "alone"),
        (2, "fused"),
        (2, "one by one"),
        (2, "processes"),
    ]
    # what each process stepped: the bench measured what its rows say
    assert [(r["processes"], r["runs_per_process"]) for r in rows] == [
        (1, 1),
        (1, 2),
        (1, 2),
        (2, 1),
    ]
    assert all(r["images_per_s"] > 0 and r["x_one_run"] > 0 for r in rows)
