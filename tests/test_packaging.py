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
