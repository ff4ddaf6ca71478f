"""Measure 2 ranks x B/2 against 1 rank x B on ResNet-20 (1-bit DoReFa, fake 32x32 data,
sync_bn, 5 steps) with tests/test_distributed.py's harness; prints per case the largest
relative loss difference and how many tensors of the final state differ (rtol 1e-4).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/ddp_equivalence.py 1e-3 ste,multifc float64

Arguments: SGD lr, meta nets (ste,multifc,fcgrad,lstmfc; both updates each), dtype. Slow on a
CPU (ResNet-20 at batch 128, float64: about 6 minutes for all cases on 2 cores).
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_distributed as t  # noqa: E402

from mq.data import loaders as mqdata  # noqa: E402
from mq.models import build_model  # noqa: E402
from mq.quant import DorefaWeight  # noqa: E402
from mq.quant.layers import quantize_model  # noqa: E402

lr, nets, dtype = float(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
torch.set_default_dtype(getattr(torch, dtype))
t.GLOBAL_BATCH = 128
t.OPTIMIZER, t.LR = torch.optim.SGD, lr
t.CASES = [c for c in t.CASES if c[0] in nets]
t._tiny_model = lambda: quantize_model(build_model("resnet20", 10), DorefaWeight(bit_width=1))


def _fake(bs, dev, num_train, num_test, image_size, rank, world_size):  # noqa: ANN001, ANN202
    return mqdata.fake_loaders(
        bs, dev, num_train=640, num_test=8, image_size=32, rank=rank, world_size=world_size
    )


t.fake_loaders = _fake
ranks = t._spawn(Path(tempfile.mkdtemp()), t.CASES)
single = {f"{n}-{u}": t.run_case(n, u, 0, 1) for n, u in t.CASES}
for name, one in single.items():
    two = ranks[0][name]
    rel = max(abs(x - y) / abs(x) for x, y in zip(one["losses"], two["losses"], strict=True))
    print(
        f"{name:16s} max rel loss diff {rel:.2e}; tensors differing: model "
        f"{len(t._close(one['model'], two['model']))}, step state "
        f"{len(t._close(one['step'], two['step']))}; replicas equal {two['replicas_equal']}"
    )
