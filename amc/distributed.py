"""Data-parallel fine-tuning under ``torchrun`` (DistributedDataParallel); rank 0 writes.

``torchrun --standalone --nproc_per_node K -m amc.cli finetune ...`` starts K processes and
sets WORLD_SIZE / RANK / LOCAL_RANK. ``launched`` joins their process group (gloo on CPU, nccl
on GPU, one GPU per rank) and silences stdout on the other ranks, so the command prints one
result; ``fit`` then trains through ``data_parallel``. Outside torchrun both are no-ops.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def launched(device: torch.device) -> Iterator[int]:
    """Join torchrun's process group for the block (nothing outside torchrun); yields this rank."""
    if world_size() == 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if rank == 0:
        print(f"amc: data-parallel on {dist.get_world_size()} processes ({backend}); rank 0 writes", file=sys.stderr)
    else:  # for the rest of the process: the command's result is rank 0's to print
        sys.stdout = open(os.devnull, "w")
    try:
        yield rank
        dist.barrier()  # every rank done with its collectives before any tears the group down
    finally:
        dist.destroy_process_group()


def data_parallel(model: nn.Module, loader: DataLoader, seed: int) -> tuple[nn.Module, DataLoader]:
    """In a process group: ``model`` in DDP and ``loader`` sharded over the ranks; else both as given.

    Each rank draws its 1/K of every epoch (``DistributedSampler``) in batches of 1/K the size,
    so the global batch, the steps per epoch and the learning-rate schedule stay those of one
    process. Call ``loader.sampler``'s ``set_epoch`` (``shuffle_epoch``) at each epoch.
    """
    if not dist.is_initialized():
        return model, loader
    world, dataset = dist.get_world_size(), loader.dataset
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    gathered = loader.batch_size is None  # make_loader's in-memory path: the dataset gathers whole batches
    per_rank = max(1, (loader.sampler.batch_size if gathered else loader.batch_size) // world)
    if gathered:
        sharded = DataLoader(dataset, sampler=BatchSampler(sampler, per_rank, drop_last=False), batch_size=None,
                             num_workers=loader.num_workers)
    else:
        sharded = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=loader.num_workers,
                             drop_last=loader.drop_last)
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids), sharded


def shuffle_epoch(loader: DataLoader, epoch: int) -> None:
    """A new shard order per epoch for a sharded loader (nothing for a plain one)."""
    sampler = loader.sampler.sampler if isinstance(loader.sampler, BatchSampler) else loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
