#!/usr/bin/env bash
# A slice of paper Table 1 on one GPU, and what running several runs at once on it gives:
#   bash scripts/gpu-slice.sh CIFAR_JPEG_TAR RESNET20_CHECKPOINT [EPOCHS] [OUT_DIR] [EXTRA...]
# e.g. bash scripts/gpu-slice.sh ../shared/data/cifar10-jpeg.tar.gz \
#        ../shared/data/original-checkpoints/ResNet20-CIFAR10-pretrain.pth 10 gpu-slice
# ResNet-20 from the original full-precision checkpoint, the CIFAR-10 JPEG copy, 1-bit dorefa
# and bwn x STE, MultiFC, FCGrad, LSTMFC, SGD lr 1e-3 (the paper's), seed 0, EPOCHS epochs
# (default 10; the lr drops at epoch 30, so a slice shorter than that runs at 1e-3 throughout).
# 1. dorefa/multifc alone (it also writes the decoded-image cache the others read);
# 2. the eight runs at once on the same GPU (each its own process; the machine's cores feed
#    them); then `python -m mq.report` over the eight, and the throughput of both phases.
# EXTRA: more overrides for every run (e.g. limit_train_batches=2 for a dry run on a CPU).
set -u
cd "$(dirname "$0")/.."
tar=$1 checkpoint=$(realpath "$2") epochs=${3:-10} out=${4:-${OUT:-gpu-slice}}
shift $(($# < 4 ? $# : 4))
py=.venv/bin/python
[ -x "$py" ] || py=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # made by this script: the unpacked images and the runs
tar xzf "$tar" -C "$work"
runs="$work/runs"
one() {  # one QUANT META [EXTRA...]: a run in $runs/QUANT-META, its console beside it (.log)
    local quant=$1 meta=$2
    shift 2
    mkdir -p "$runs"
    "$py" launch.py model=resnet20 dataset=cifar10_folder "dataset.root=$work" \
        "dataset.cache=$work/cache.pt" "model.pretrained=$checkpoint" quant="$quant" meta="$meta" \
        optimizer=sgd seed=0 epochs="$epochs" logger=none progress=false \
        "hydra.run.dir=$runs/$quant-$meta" "$@" >"$runs/$quant-$meta.log" 2>&1
}
pairs="dorefa:ste dorefa:multifc dorefa:fcgrad dorefa:lstmfc bwn:ste bwn:multifc bwn:fcgrad bwn:lstmfc"
start=$(date +%s)
one dorefa multifc "$@" || echo "dorefa/multifc alone: exit $?"
alone=$(($(date +%s) - start))
mv "$runs/dorefa-multifc" "$work/alone" && mv "$runs/dorefa-multifc.log" "$work/alone.log"
start=$(date +%s)
for pair in $pairs; do one "${pair%:*}" "${pair#*:}" "$@" & done
wait
together=$(($(date +%s) - start))
"$py" -m mq.report "$runs" --out "$out/report" --last 1 >"$out/report.log" 2>&1 \
    || echo "report: exit $?"
"$py" - "$work" "$alone" "$together" "$epochs" <<'PY' | tee "$out/slice.txt"
import json, sys
from pathlib import Path
work, alone, together, epochs = Path(sys.argv[1]), *map(float, sys.argv[2:4]), int(sys.argv[4])
def summary(run: Path) -> dict:
    path = run / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {"status": "no summary"}
def line(name: str, s: dict) -> str:
    acc = s.get("final_test_acc")
    acc = f"{acc:.2f}" if isinstance(acc, float) else "-"
    return f"{name:<16} final test acc {acc:>6}  {s.get('status')}  elapsed {s.get('elapsed', 0):.0f} s"
print(f"{epochs} epochs each, ResNet-20, CIFAR-10 JPEG copy, SGD lr 1e-3, seed 0")
print("alone:    " + line("dorefa-multifc", summary(work / "alone")) + f", {alone:.0f} s wall")
done = 0
for run in sorted(p for p in (work / "runs").iterdir() if p.is_dir()):
    s = summary(run)
    done += s.get("status") == "completed"
    print("together: " + line(run.name, s))
print(f"8 at once: {together:.0f} s wall, {done} completed; one alone: {alone:.0f} s; "
      f"throughput {done * alone / together:.2f}x one run alone (wall clock, start-up included)")
PY
tar czf "$out/runs.tgz" -C "$work" --exclude=checkpoint.pt --exclude=cache.pt runs alone alone.log
