"""Multi-process training under ``torchrun`` (torch.distributed; gloo on the CPU, NCCL on GPUs).

Each process trains on its own shard of every epoch's batches (the same seeded permutation on
every rank, rank r taking its slice: what DistributedSampler does), gradients are averaged over
processes after each backward pass (DDP's all-reduce), BatchNorm buffers are broadcast from rank
0 before evaluation (DDP's ``broadcast_buffers``) so that every rank evaluates the same model and
takes the same early-stopping decision, and rank 0 alone writes the run directory.
``train.batch_size`` is per process: the global batch is ``world_size`` times larger.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def setup(device: str = "auto") -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def local_device(device: torch.device) -> torch.device:
    """cuda:LOCAL_RANK for a CUDA run under torchrun; the device as given otherwise."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_module(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (unless buffers_only) and buffers to every rank."""
    if not active():
        return
    tensors = list(module.buffers()) + ([] if buffers_only else [p.data for p in module.parameters()])
    for t in tensors:
        dist.broadcast(t, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of each gradient over processes, in one flat all-reduce."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over processes (NaNs stay NaN)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    t /= world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any of them (so all stop together)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _comm_device() -> torch.device:
    """Where small tensors for a collective must live: NCCL only reduces CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cleanup() -> None:
    """Leave the process group (end of a torchrun process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
