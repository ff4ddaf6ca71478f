"""mq.core.allocator: freed memory stays in the process, so a step does not page-fault it
back in."""

import statistics
import subprocess
import sys

import pytest

from mq.core.allocator import keep_freed_memory

# Minor page faults of each of 18 real training steps (ResNet20, DoReFa, MultiFC, batch 128 as
# in training) in a fresh process, with glibc's defaults or after keep_freed_memory(). At batch
# 32 or 64 glibc's own behaviour is erratic (a whole run without faults happens).
PROBE = """
import functools, resource, sys, torch
from mq.core.allocator import keep_freed_memory
from mq.meta import MetaQuantStep, MultiFC
from mq.models import build_model
from mq.quant import DorefaWeight, quantize_model
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = quantize_model(build_model("resnet20", 10), DorefaWeight(1))
optimizer = functools.partial(torch.optim.SGD, lr=1e-3)
step = MetaQuantStep(model, optimizer, MultiFC(hidden_size=8))
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
for _ in range(18):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step.train_step(x, y)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def step_faults(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return [int(line) for line in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.slow  # times many training steps in two fresh processes
def test_keep_freed_memory_stops_page_faults_between_steps():
    default, kept = step_faults("default")[3:], step_faults("keep")[3:]  # after warm-up
    # measured per step: medians of 17,000-22,000 faults with glibc's defaults (it gives freed
    # activations back to the OS and the next step maps them again); kept, 0-1 in most steps,
    # with a heap growth of 1-12 MB (256-3,000 faults) in some, so 15 steps for a steady median
    assert statistics.median(default) > 500, default
    assert statistics.median(kept) <= 16, kept


def test_keep_freed_memory_is_safe_to_call_twice():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
