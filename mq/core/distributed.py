"""Data parallelism on torch.distributed: who this process is, and the few collectives mq uses.

A job is one process per rank, started by ``torchrun`` (env:// rendezvous: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or by SLURM through submitit (several tasks of one job:
``submitit.helpers.TorchDistributedEnvironment`` reads submitit's JobEnvironment and exports the
same variables). NCCL on CUDA, gloo on the CPU. With one process nothing here does anything, so
a plain ``python launch.py`` run is exactly what it was.

Every rank feeds its shard of the same global batch through an identical model; the gradients
(MetaQuant's flat g_W^ and the other parameters') are averaged with one all-reduce per step, so
every rank takes the same optimizer and meta-net steps and the parameters stay identical.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mq.core.errors import ConfigError

log = logging.getLogger(__name__)
# GlobalBatchNorm needs the differentiable all-reduce; its suggested replacement is private.
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce is deprecated")

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; ``Ranks()`` is a single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    # Started by torchrun or as a task of a multi-task submitit job: joins a process group even
    # with one rank (torchrun --nproc_per_node=1 exercises NCCL and the collectives on one GPU).
    launched: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs to wandb."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def _submitit_tasks() -> int:
    """Tasks of the submitit job this process belongs to (0 outside submitit)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 0
    import submitit

    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:
        return 0


def ranks_from_env() -> Ranks:
    """Ranks of this process as torchrun or submitit set them; SINGLE otherwise. Under a
    submitit job of several tasks, MASTER_ADDR/PORT, RANK, ... are exported from submitit's
    JobEnvironment (first node of the allocation, a port derived from the job id)."""
    if "RANK" not in os.environ and _submitit_tasks() > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return SINGLE
    world = int(os.environ["WORLD_SIZE"])
    return Ranks(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        launched=True,
    )


def choose_backend(name: str, device: str, ranks: Ranks) -> str:
    """The process-group backend: NCCL with CUDA, gloo without; ConfigError when the request
    cannot work here (checked before anything is written)."""
    if name not in BACKENDS:
        raise ConfigError(
            f"distributed.backend={name} is not known; allowed: {', '.join(BACKENDS)}"
        )
    cuda = torch.cuda.is_available() and device != "cpu"
    if name == "nccl" and not cuda:
        why = "device=cpu" if device == "cpu" else "no CUDA device is available"
        raise ConfigError(
            f"distributed.backend=nccl needs CUDA but {why}; allowed here: gloo, auto"
        )
    backend = name if name != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and ranks.local_world_size > torch.cuda.device_count():
        raise ConfigError(
            f"{ranks.local_world_size} ranks per node but {torch.cuda.device_count()} GPUs; "
            f"allowed: at most {torch.cuda.device_count()} ranks per node with NCCL "
            "(or distributed.backend=gloo device=cpu)"
        )
    return backend


def check_batch(batch_size: int, ranks: Ranks) -> None:
    if batch_size % ranks.world_size:
        raise ConfigError(
            f"batch_size={batch_size} does not divide evenly across {ranks.world_size} ranks; "
            f"allowed: a multiple of {ranks.world_size} (batch_size is the global batch)"
        )


def init(ranks: Ranks, backend: str, timeout_s: float) -> torch.device | None:
    """Join the process group (idempotent); returns this rank's CUDA device for NCCL, else None.
    ``timeout_s`` bounds every collective: a rank that died or hangs ends the others' wait
    with an error instead of hanging the job."""
    device = None
    if backend == "nccl":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if ranks.launched and not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=ranks.rank,
            world_size=ranks.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device,
        )
        log.info("rank %d of %d joined (%s)", ranks.rank, ranks.world_size, backend)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """In a process group (of one rank too, under torchrun --nproc_per_node=1)."""
    return dist.is_available() and dist.is_initialized()


def is_collective_error(exc: BaseException) -> bool:
    """A collective that failed because a peer is gone or timed out (gloo raises a plain
    RuntimeError naming itself; NCCL a DistBackendError)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and ("gloo" in str(exc) or "NCCL" in str(exc))


def average_(tensor: Tensor) -> Tensor:
    """In place: the mean over ranks (no-op with one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def sum_(tensor: Tensor) -> Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(flat: Tensor | None, params: list[nn.Parameter]) -> None:
    """Average ``flat`` (MetaQuant's g_W^) and the ``.grad`` of ``params`` over ranks with ONE
    all-reduce: they are packed into one buffer and unpacked after."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    parts = ([] if flat is None else [flat.reshape(-1)]) + [g.reshape(-1) for g in grads]
    if not parts:
        return
    buffer = average_(torch.cat(parts))
    offset = 0
    for t in ([] if flat is None else [flat]) + grads:
        t.copy_(buffer[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def agree(code: int) -> int:
    """The largest ``code`` of all ranks (stop requests: any rank's signal stops all of them at
    the same step boundary)."""
    if not active():
        return code
    t = torch.tensor([code], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_floats(values: list[float]) -> list[float]:
    """Rank 0's ``values`` on every rank (its evaluation, say)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.broadcast(t, src=0)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()


def replicas_equal(tensors: list[Tensor]) -> bool:
    """True when every rank holds the same values in ``tensors`` (parameters that data
    parallelism keeps identical). Cheap: two float64 checksums per tensor, compared by their
    min and max over ranks, two all-reduces of a few numbers."""
    if not active() or not tensors:
        return True
    sums = [t.detach().double() for t in tensors]
    check = torch.stack([s.sum() for s in sums] + [s.abs().sum() for s in sums]).to(_device())
    high, low = check.clone(), check.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are those of the global batch, for gloo on the CPU
    (torch's SyncBatchNorm runs on GPUs only). The statistics go through the differentiable
    all-reduce of torch.distributed.nn, whose backward all-reduces their gradients, as
    SyncBatchNorm's does. Two passes (mean, then the centred sum of squares), like BatchNorm's
    own variance, so 2 ranks x 64 match 1 rank x 128 to float rounding."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        summed = all_reduce(torch.cat([x.sum(dims), local]))
        n = summed[-1]
        mean = summed[:-1] / n
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * n / (n - 1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``sync_bn=true``: batch statistics over the global batch. torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm on the CPU; the state dict keys stay those of BatchNorm2d."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = GlobalBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
                device=device,
            )
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            setattr(model, name, bn)
        else:
            sync_batchnorm(child, device)
    return model


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
