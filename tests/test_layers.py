"""mq's packages as layers (pyproject.toml's [tool.importlinter]): every import points down, and
an import that points up fails the lint step."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "mq", tmp_path / "mq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    keys = tmp_path / "mq/core/keys.py"
    keys.write_text(keys.read_text() + "\nfrom mq.job.run import check  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" in result.stdout and "mq.core.keys -> mq.job.run" in result.stdout


def test_a_new_package_must_be_given_its_layer(tmp_path):
    shutil.copytree(ROOT / "mq", tmp_path / "mq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "mq/extras").mkdir()
    (tmp_path / "mq/extras/__init__.py").write_text("")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "mq.extras" in result.stdout + result.stderr


def test_no_import_cycle_between_mq_modules():
    """Not even inside one package: every module can be read (and moved) with what it imports
    below it. Function-level imports count too."""
    import grimp

    graph = grimp.build_graph("mq", cache_dir=None)
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    cycles = []
    for module in sorted(imports):
        reached, todo = set(), list(imports[module])
        while todo:
            other = todo.pop()
            if other not in reached:
                reached.add(other)
                todo.extend(imports.get(other, ()))
        if module in reached:
            cycles.append(module)
    assert not cycles, f"modules that import themselves through others: {cycles}"
