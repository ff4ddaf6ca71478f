"""README.md's command blocks run as written, in order, in a copy of the repository: the
```bash blocks one after another in one folder, so each block finds what the ones before it
left (the pretrain run the quantization reads, the quantization run the eval reads).

Toy size: every ``python launch.py`` gets TOY's keys instead of the README's values for them
(a shell function stands in for ``python``; nothing else of a command changes). The offline data
the README reads from ../shared/data is generated next to the copy in the same on-disk format:
a small CIFAR-10-like JPEG tar (train/<class>/*.jpg, test/<class>/*.jpg) and a full-precision
ResNet20 in the released checkpoints' key layout (MQ_README_DATA=real reads the real
../shared/data instead: CIFAR-10's 60,000 JPEGs and the released ResNet20). Blocks that need a
network, a wandb account or SLURM are left out (SKIPPED says why); the quick start's set-up is
checked by tests/test_packaging.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
TOY = {
    "epochs": "1",
    "limit_train_batches": "2",
    "limit_test_batches": "1",
    "batch_size": "32",
    "logger": "none",
    "progress": "false",
}
# A block is left out when it contains one of these: why.
SKIPPED = {
    "make run": "the quick start downloads CIFAR-10 and `make test` is the suite itself",
    "wandb login": "needs a wandb account and a network",
    "slurm": "needs a SLURM cluster (tests/test_sweeps_slurm.py covers the launcher)",
}
# ``python launch.py ...`` with TOY's keys replacing the command's own values for them.
SHIM = """
python() {
  if [ "${1:-}" != launch.py ] || [ "${2:-}" = -sc ]; then command "$MQ_PY" "$@"; return; fi
  local args=() a
  for a in "$@"; do
    case "$a" in %s) ;; *) args+=("$a") ;; esac
  done
  command "$MQ_PY" "${args[@]}" %s
}
"""


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def skip_reason(block: str) -> str | None:
    return next((why for key, why in SKIPPED.items() if key in block), None)


def make_offline_data(shared: Path, train_per_class: int = 250, test_per_class: int = 30) -> None:
    """../shared/data as the README expects it, small: the JPEG tar and the ResNet20 file."""
    import numpy as np
    import torch
    from PIL import Image

    from mq.models.resnet_cifar import CifarResNet

    classes = "airplane automobile bird cat deer dog frog horse ship truck".split()
    tree = shared / "tree"
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            folder = tree / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 64, (32, 32, 3), dtype=np.uint8) + 19 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=75)
    with tarfile.open(shared / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tree / split, arcname=split)
    shutil.rmtree(tree)
    (shared / "original-checkpoints").mkdir()
    torch.manual_seed(1)  # not the runs' own seed-0 initialisation
    state = CifarResNet(20, 10).state_dict()
    torch.save(state, shared / "original-checkpoints" / "ResNet20-CIFAR10-pretrain.pth")


def copy_repository(dest: Path) -> None:
    """The checkout as a fresh clone has it (tracked and unignored files), plus the venv."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = ROOT / name
        if source.is_file() or source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)
    (dest / ".venv").symlink_to(Path(sys.prefix))


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 8, "README.md's ```bash blocks were not found"
    shared = tmp_path / "shared" / "data"
    shared.parent.mkdir()
    if os.environ.get("MQ_README_DATA") == "real":  # the real ../shared/data, read in place
        if not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file():
            pytest.skip(f"MQ_README_DATA=real: no {SHARED_DATA}/cifar10-jpeg.tar.gz")
        shared.symlink_to(SHARED_DATA.resolve())
    else:
        shared.mkdir()
        make_offline_data(shared)
    repo = tmp_path / "mq"
    copy_repository(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("MQ_CHECKPOINTS", "PYTHONPATH")}
    env.update(MQ_PY=sys.executable, OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONPATH=str(repo))
    toy_keys = "|".join(f"{key}=*" for key in TOY)
    toy = " ".join(f"{key}={value}" for key, value in TOY.items())
    shim = SHIM % (toy_keys, toy)
    report = []
    for number, block in enumerate(blocks, 1):
        head = block.strip().splitlines()[0][:70]
        reason = skip_reason(block)
        if reason:
            report.append(f"block {number:2d}  skipped   {head}  ({reason})")
            continue
        start = time.monotonic()
        done = subprocess.run(
            ["bash", "-c", f"set -euo pipefail\n{shim}\n{block}"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        seconds = time.monotonic() - start
        report.append(f"block {number:2d}  {seconds:6.1f} s  {head}")
        assert done.returncode == 0, (
            f"README block {number} failed (exit {done.returncode}):\n{block}\n"
            f"stderr: {done.stderr[-3000:]}"
        )
    print("\n" + "\n".join(report))

    # The pretrain -> quantize -> eval chain read what the block before it wrote.
    outputs = repo / "outputs"
    quantized = outputs / "quantize/cifar10_folder/resnet20-w1-from-fp"
    assert "resnet20-fp-sgdm-s0" in (quantized / "config.yaml").read_text()
    (evaluated,) = (outputs / "eval/cifar10_folder").glob("*resnet20-w1-from-fp-*")
    assert (evaluated / "summary.json").is_file()
    original = outputs / "quantize/cifar10_folder/resnet20-w1-from-original/config.yaml"
    assert "original-checkpoints/ResNet20-CIFAR10-pretrain.pth" in original.read_text()


def test_readme_blocks_are_found_and_skips_are_named():
    """The parts the walk relies on: every bash block is either run or skipped for a reason,
    the chain's commands are there, and no command keeps a placeholder."""
    blocks = bash_blocks((ROOT / "README.md").read_text())
    run = [b for b in blocks if skip_reason(b) is None]
    text = "\n".join(run)
    assert "task=pretrain" in text and "task=eval" in text
    for placeholder in ("PATH", "DIR", "NAME"):
        assert not re.search(rf"\b{placeholder}\b", text), placeholder
