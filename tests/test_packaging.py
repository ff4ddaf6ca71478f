"""pyproject.toml and environment.yml name the same dependencies."""

import re

import tomllib
import yaml
from conftest import ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pinned = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-")}
    wanted = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    assert pinned == wanted
    assert "-e ." in pip


STUB = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls"
[[ $1 == -c ]] && exit 1  # "not installed yet": setup.sh installs
exit 0
"""


def test_setup_passes_a_cpu_torch_index_to_pip_only_when_asked(tmp_path):
    import os
    import shutil
    import subprocess

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/setup.sh", tmp_path / "scripts/setup.sh")
    python = tmp_path / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB)
    python.chmod(0o755)
    url = "https://download.pytorch.org/whl/cpu"
    for env in ({}, {"MQ_TORCH_INDEX": url}):
        (python.parent / "calls").unlink(missing_ok=True)
        run = subprocess.run(
            ["bash", str(tmp_path / "scripts/setup.sh")],
            env={**{k: v for k, v in os.environ.items() if k != "MQ_TORCH_INDEX"}, **env},
            capture_output=True,
            text=True,
        )
        install = [c for c in (python.parent / "calls").read_text().splitlines() if "-e" in c]
        assert len(install) == 1, run.stderr
        assert (f"--extra-index-url {url}" in install[0]) == bool(env)
