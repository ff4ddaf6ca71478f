#!/usr/bin/env bash
# Everything a GPU session should run, in one command (a few minutes on one H100):
#   bash scripts/gpu-check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check)
# 1. the CUDA tests (CUDA code paths against the CPU's, launch.py on CUDA);
# 2. the benchmark: a whole epoch per variant (its 100ep min column for dorefa/multifc is the
#    issue's goal: under 5 minutes on one H100), then LSTMFC with a bf16 state and eager, and
#    STE and MultiFC steps without cuDNN's algorithm search (cudnn_benchmark=false).
# Each part runs even if an earlier one fails; the exit status is the first failure's.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
# The checkout's .venv when there is one, else the machine's python3 (GPU images often have
# torch there and no `python`); run from the checkout, so mq is importable without installing.
py=.venv/bin/python
[ -x "$py" ] || py=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
run() {  # run NAME COMMAND...: output to OUT/NAME.log and the terminal
    echo "== $1"
    local name=$1
    shift
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
run env "$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
run tests "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_data.py \
    tests/test_imagenet.py -k cuda
# ImageNet input: nvJPEG batched decode against libjpeg-turbo workers and PIL (docs/imagenet.md)
run bench-loader bash -c "'$py' -m mq.bench_loader make '$out/inet-like' --files 2500 >/dev/null \
    && '$py' -m mq.bench_loader '$out/inet-like' --workers 0,4,8 --batch-size 128 --batches 4 \
    --rounds 1 --device cuda --out '$out/bench-loader.json'; rc=\$?; rm -rf '$out/inet-like'; exit \$rc"
run bench "$py" -m mq.bench --device cuda --out "$out/bench-cuda.json"
run bench-bf16 "$py" -m mq.bench --device cuda --nets ste,lstmfc --state-dtype bfloat16 \
    --no-epoch --out "$out/bench-cuda-bf16.json"
run bench-eager "$py" -m mq.bench --device cuda --nets ste,lstmfc --no-compile --no-epoch \
    --out "$out/bench-cuda-eager.json"
run bench-no-cudnn-benchmark "$py" -m mq.bench --device cuda --nets ste,multifc --no-epoch \
    --no-cudnn-benchmark --out "$out/bench-cuda-no-cudnn-benchmark.json"
# The numbers the issue asks for, from the first benchmark's JSON.
if [ -f "$out/bench-cuda.json" ]; then
    "$py" - "$out/bench-cuda.json" <<'PY' | tee "$out/summary.txt"
import json, sys
data = json.load(open(sys.argv[1]))
print(f"device: {data.get('device_name', data['device'])}")
for name in ("fp", "dorefa/ste", "dorefa/multifc", "bwn/ste", "bwn/multifc"):
    step, epoch = data["steps"].get(name), data["epochs"].get(name, {})
    if step:
        print(f"{name:<16} {step['ms']:7.2f} ms/step  {step['ops']:5d} ops  "
              f"{epoch.get('images_per_s', float('nan')):8.0f} img/s  "
              f"{epoch.get('projected_100_epochs_min', float('nan')):6.2f} min per 100 epochs")
goal = data["epochs"].get("dorefa/multifc", {}).get("projected_100_epochs_min")
if goal is not None:
    print(f"goal, 100-epoch ResNet20 MultiFC under 5 min: {goal:.2f} min, "
          f"{'met' if goal < 5 else 'NOT met'}")
PY
fi
exit "$status"
