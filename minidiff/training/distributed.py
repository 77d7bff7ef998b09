"""Data order and torch.distributed for the training loop.

The data order is a pure function of (seed, epoch, position), so a resumed run and an uninterrupted one
read the same batches, and the processes of a DDP run (launched by ``torchrun``, which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) split each global batch between them.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate


def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """The item order of ``epoch``, from (seed, epoch) alone: resuming needs no saved sampler state."""
    return np.random.default_rng([seed, epoch]).permutation(num_items).tolist()


class EpochBatches:
    """Endless batch sampler over global micro-batches of ``batch_size`` items: micro-batch k is slice
    ``k % per_epoch`` of ``epoch_permutation(seed, k // per_epoch)`` (the incomplete last batch of an
    epoch is dropped). Process ``rank`` of ``world_size`` takes its contiguous share of each, so together
    the processes see exactly the single-process batch. ``start`` is the first micro-batch (for resuming)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        if batch_size > num_items or batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be <= the {num_items} items and a multiple of "
                             f"world_size={world_size}")
        self.num_items, self.batch_size, self.seed, self.start = num_items, batch_size, seed, start
        self.per_epoch = num_items // batch_size
        self.share = batch_size // world_size
        self.offset = rank * self.share

    def __iter__(self) -> Iterator[list[int]]:
        micro, order, order_epoch = self.start, [], -1
        while True:
            epoch, index = divmod(micro, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_permutation(self.num_items, self.seed, epoch), epoch
            first = index * self.batch_size + self.offset
            yield order[first : first + self.share]
            micro += 1


def data_loader(dataset: Dataset, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                **kwargs: Any) -> DataLoader:
    """A DataLoader over ``EpochBatches`` (``kwargs`` go to DataLoader: num_workers, pin_memory, ...)."""
    sampler = EpochBatches(len(dataset), batch_size, seed, start, rank, world_size)
    # Its own generator: creating the iterator must not draw from the global RNG (exact resume). The
    # workers' seeds follow ``start``: with num_workers > 0 and random augmentation in the dataset, a
    # resumed run differs from an uninterrupted one.
    seeds = torch.Generator().manual_seed(seed * 1_000_003 + start)
    return DataLoader(dataset, batch_sampler=sampler, generator=seeds, collate_fn=_collate, **kwargs)


def _collate(items: list[Any]) -> Any:
    """torch's default collation, with an error naming the cause when the items of a batch differ."""
    try:
        return default_collate(items)
    except RuntimeError as err:
        raise ValueError(f"dataset items cannot be stacked into a batch: every item must have the same shapes and "
                         f"kinds ({err})") from None


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, whether we created the process group). Under torchrun (WORLD_SIZE > 1)
    this joins the process group: nccl with one GPU per process (cuda:LOCAL_RANK), gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not dist.is_initialized():
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), False
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device_ = torch.device("cuda", local_rank)
    else:
        device_ = torch.device("cpu")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device_, created


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every process, in rank order (the list ``[obj]`` without distribution)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def mean_and_any(value: Tensor, flags: tuple[bool, ...], world_size: int) -> tuple[float, tuple[bool, ...]]:
    """The mean of ``value`` over the processes and, for each of ``flags``, whether any process set it, in one
    all-reduce."""
    if world_size == 1:
        return float(value), tuple(flags)
    packed = torch.cat([value.float().reshape(1), torch.tensor([float(f) for f in flags], device=value.device)])
    dist.all_reduce(packed)
    return float(packed[0]) / world_size, tuple(bool(f > 0) for f in packed[1:])


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
