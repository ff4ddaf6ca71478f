"""Tasks by ``_target_``: conf/task/ names each task's class (mq.job.tasks); a new task is its
class and its YAML file; run folders saved before tasks had targets are the same runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE, launch, task_config
from omegaconf import OmegaConf

from mq.core.errors import ConfigError
from mq.job.identity import check_run_dir, result_config
from mq.models.resnet_cifar import CifarResNet

COUNT_TASK = '''
import json

from mq.job.tasks import Task


class CountParameters(Task):
    """Counts the model's parameters: reads no data, trains nothing."""

    def __call__(self, job):
        count = sum(p.numel() for p in job.model.parameters())
        summary = {"status": "completed", "parameters": count}
        (job.run_dir / "summary.json").write_text(json.dumps(summary))
        return summary
'''
COUNT_YAML = """# @package _global_
defaults:
  - /schema/task/task@task
  - _self_
task:
  _target_: count_task.CountParameters
  name: count
logger:
  _target_: null
"""


def test_a_new_task_is_its_class_and_its_yaml(tmp_path, monkeypatch):
    (tmp_path / "count_task.py").write_text(COUNT_TASK)
    options = tmp_path / "more_conf" / "task"
    options.mkdir(parents=True)
    (options / "count.yaml").write_text(COUNT_YAML)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # launch() puts the checkout before it
    search = f"hydra.searchpath=[file://{tmp_path / 'more_conf'}]"
    done = launch("task=count", search, "quant=none", "model=resnet32", *SMOKE, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs/count/fake").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parameters"] == sum(p.numel() for p in CifarResNet(32, 10).parameters())


@pytest.mark.parametrize("task", ["quantize", "pretrain", "eval"])
def test_a_run_saved_before_tasks_had_targets_is_the_same_run(tmp_path, task):
    """Run folders hold ``task: {name: NAME}`` from before conf/task/ named classes; the resume
    check (and the report) read them as today's task node."""
    pretrained = tmp_path / "fp.pth"
    torch.save(CifarResNet(20, 10).state_dict(), pretrained)
    job_cfg = task_config([f"task={task}", f"model.pretrained={pretrained}"])
    old = result_config(job_cfg)
    assert old["task"]["_target_"].startswith("mq.job.tasks.")
    old["task"] = {"name": task}
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    assert check_run_dir(job_cfg, tmp_path) == {}
    old["task"] = {"name": "pretrain" if task == "quantize" else "quantize"}  # another run
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"holds a run with another config \(.*task\."):
        check_run_dir(job_cfg, tmp_path)


@pytest.mark.slow  # a launch; test_safety's in-process check_name test takes the names
def test_a_task_name_is_a_folder_name(tmp_path):
    done = launch("task.name=../x", *SMOKE, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: task.name='../x' is not allowed; allowed: letters, digits and - _ . = , + "
        "(not starting with '.'), at most 200 characters"
    ]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "x").exists()
