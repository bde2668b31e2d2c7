"""Data-parallel training under ``torchrun``: the process group, which pairs each rank takes, and the
collectives that make the ranks compute the single-process loss and gradients.

Every batch (a list of global pair indices, the same on every rank) is cut into ``world`` equal,
contiguous slices in rank order; rank r encodes slice r. ``all_gather_with_grad`` concatenates the
ranks' embeddings in that same order, so row i of the gathered anchors and positives still belongs to
pair i and the loss sees the global batch; ``average_gradients`` then makes every rank hold the mean
gradient. With one process every helper is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Join the process group that ``torchrun`` set up (nothing to do for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slices(batch: list[int], world: int) -> list[list[int]]:
    """``batch`` cut into ``world`` equal contiguous slices, slice r for rank r (``len(batch)`` must be a
    multiple of ``world``)."""
    per_rank = len(batch) // world
    return [batch[r * per_rank:(r + 1) * per_rank] for r in range(world)]


def chunk_groups(batch: list[int], world: int, chunk_size: int) -> list[list[int]]:
    """For ``negatives: chunk``: the pairs the loss of each chunk sees, i.e. chunk k (``chunk_size``
    pairs) of every rank's slice, in rank order: what ``all_gather_with_grad`` concatenates."""
    slices = rank_slices(batch, world)
    return [[i for sl in slices for i in sl[k:k + chunk_size]] for k in range(0, len(slices[0]), chunk_size)]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 in rank order; gradients flow back to this rank's
    part. Returns ``x`` itself for a single process."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather  # autograd-aware collectives: only when distributed

    return torch.cat(all_gather(x), dim=0)


def average_gradients(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """All-reduce the ``.grad`` of every trainable parameter in ``params`` and divide it by ``world``, so
    every rank holds the gradient of the global batch; nothing to do for one process."""
    if world == 1:
        return
    for prm in params:
        if prm.requires_grad and prm.grad is not None:
            dist.all_reduce(prm.grad)
            prm.grad /= world
