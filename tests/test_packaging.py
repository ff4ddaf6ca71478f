"""pyproject.toml and environment.yml name the same dependencies."""

import re
from pathlib import Path

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


def test_the_package_builds_without_warnings(tmp_path):
    """pyproject.toml in today's form (an SPDX license string): building mq prints no
    deprecation warnings (a license table gave ~17 lines of them per build step)."""
    import shutil
    import subprocess
    import sys

    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("mq", "hydra_plugins"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            "dist",
            ".",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    output = build.stdout + build.stderr
    assert "warning" not in output.lower(), output[-3000:]
    assert list((tmp_path / "dist").glob("mq-*.whl"))


STEP_STUB = """#!/usr/bin/env bash
echo "$* PYTHONWARNINGS=${PYTHONWARNINGS:-}" >> "$(dirname "$0")/calls"
# "not installed yet" until pip has installed mq; then the final import check passes
[[ $1 == -c ]] && ! grep -q -- "-e" "$(dirname "$0")/calls" && exit 1
exit 0
"""


def test_setup_says_each_step_and_how_to_get_the_cpu_build_before_the_install(tmp_path):
    """Progress: one `setup: ...` line per step. Without an NVIDIA GPU, one line before the
    big install saying how to get torch's CPU-only build; not with a GPU, not when asked for
    an index already, and nothing at all once the venv is complete."""
    import os
    import shutil
    import subprocess

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/setup.sh", tmp_path / "scripts/setup.sh")
    python = tmp_path / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(STEP_STUB)
    python.chmod(0o755)
    gpu = tmp_path / "gpu"  # a PATH entry whose nvidia-smi lists a GPU
    gpu.mkdir()
    (gpu / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
    (gpu / "nvidia-smi").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k != "MQ_TORCH_INDEX"}
    has_gpu = bool(list(Path("/dev").glob("nvidia[0-9]*"))) or shutil.which("nvidia-smi")

    def setup(**env: str) -> list[str]:
        (python.parent / "calls").unlink(missing_ok=True)
        run = subprocess.run(
            ["bash", str(tmp_path / "scripts/setup.sh")],
            env={**base, **env},
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        lines = run.stderr.splitlines()
        assert all(line.startswith("setup: ") for line in lines), lines
        return lines

    def hint(lines: list[str]) -> list[str]:
        return [line for line in lines if "MQ_TORCH_INDEX=" in line]

    lines = setup()
    # setuptools' notice on every editable install is filtered out (pip's output stays quiet)
    (install,) = [c for c in (python.parent / "calls").read_text().splitlines() if " -e " in c]
    assert "PYTHONWARNINGS=ignore:Editable installation" in install
    steps = ["upgrading pip", "installing mq", "checking the install", "done"]
    at = [next(i for i, line in enumerate(lines) if step in line) for step in steps]
    assert at == sorted(at), lines
    if not has_gpu:
        (line,) = hint(lines)
        assert "MQ_TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/setup.sh" in line
        assert lines.index(line) < at[1]  # before the download
    assert not hint(setup(PATH=f"{gpu}{os.pathsep}{base['PATH']}"))
    assert not hint(setup(MQ_TORCH_INDEX="https://download.pytorch.org/whl/cpu"))

    python.write_text("#!/usr/bin/env bash\nexit 0\n")  # everything importable already
    assert setup() == []


def test_the_package_says_its_own_version():
    """``mq.__version__`` is what pyproject.toml releases (it said 0.5.0 through 0.7.0)."""
    import mq

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert mq.__version__ == project["version"]
