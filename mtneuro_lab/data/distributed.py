"""What makes N DDP ranks do the work of one process: global batches split over the ranks,
random streams per ``(seed, rank, epoch, batch)``, and tensors gathered from every rank.

**Global batches.** An epoch is a sequence of GLOBAL batches of ``data.batch_size`` items
taken from one order that every rank computes alike (seeded by ``(seed, epoch)``); rank ``r``
runs the ``r``-th of ``world`` equal parts of each. Every rank therefore runs the same number of
steps whatever the split size, and one step of N ranks sees exactly the samples one process
sees. A last, partial global batch is dropped (``data.drop_last: true``) or, for training,
padded by wrapping around to the start of the order until it divides by the number of ranks
(``false``). Evaluation never pads: the last batch is split as evenly as it goes (a rank may
get one sample less, or none), so every sample is scored exactly once.

**Random streams.** Before every training batch the torch (CPU and CUDA), NumPy and Python
generators are reseeded from ``(seed, rank, epoch, batch)``: augmentation, SSL view crops,
mixup and dropout draws differ between ranks (they hold different samples), and any batch's
draws are the same whether the run went straight through or resumed from a checkpoint.
Weight initialisation happens before any of this, from ``seed`` alone, so it is the same on
every rank.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd import Function


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (``(0, 1)`` outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- random streams --------------------------------------------------------------------------
def stream_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """A 63-bit seed for one rank's one batch, well mixed (NumPy's SeedSequence)."""
    words = np.random.SeedSequence([int(seed) % 2**64, int(rank), int(epoch), int(batch)]).generate_state(2)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def seed_streams(seed: int, rank: int, epoch: int, batch: int) -> None:
    """Reseed torch (every device), NumPy and Python from ``(seed, rank, epoch, batch)``."""
    value = stream_seed(seed, rank, epoch, batch)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


# -- global batches --------------------------------------------------------------------------
def rank_batch_count(n: int, global_batch: int, rank: int, world: int, drop_last: bool, pad: bool) -> int:
    """How many batches rank ``rank`` gets from ``n`` items (see :func:`rank_share`)."""
    full, rest = divmod(n, global_batch)
    if not rest or drop_last:
        return full
    if pad:
        return full + 1
    return full + int((rank + 1) * rest // world > rank * rest // world)


def rank_share(chunk: torch.Tensor, order: torch.Tensor, rank: int, world: int, pad: bool) -> torch.Tensor:
    """Rank ``rank``'s part of one global batch ``chunk`` (a slice of ``order``).

    A chunk that does not divide by ``world`` is padded with the first items of ``order``
    (``pad``), or split into parts whose sizes differ by at most one (evaluation).
    """
    size = len(chunk)
    if pad and size % world:
        need = world - size % world
        wrap = order.repeat(-(-need // len(order)))[:need]
        chunk, size = torch.cat([chunk, wrap]), size + need
    return chunk[rank * size // world : (rank + 1) * size // world]


class GlobalBatchLoader:
    """Iterates over this rank's parts of an epoch's global batches; resumable mid-epoch.

    Subclasses give the epoch's item order (:meth:`epoch_order`) and turn a rank's items into
    a batch (:meth:`make_batch`). The epoch comes from ``epoch_fn`` (the trainer's epoch), so an
    order depends neither on how many batches were drawn before nor on a cut-short epoch.

    Resumption: Lightning prefetches one batch ahead, so "batches yielded" overstates progress.
    The datamodule calls :meth:`mark_consumed` when a batch reaches the model, and
    :meth:`state_dict` reports consumed batches: a checkpoint taken after batch ``k`` resumes
    at batch ``k + 1`` of the same order.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        drop_last: bool,
        pad: bool,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        self.n = n
        self.batch_size = batch_size  # global: this rank runs batch_size // world_size of each
        self.drop_last = drop_last
        self.pad = pad
        self.rank = rank
        self.world_size = world_size
        self.epoch_fn = epoch_fn
        self._own_epoch = 0  # used when no epoch_fn is given
        self._iter_epoch = 0
        self._consumed = 0
        self._resume: dict[str, int] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_batch(self, items: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return rank_batch_count(self.n, self.batch_size, self.rank, self.world_size, self.drop_last, self.pad)

    def rank_batches(self, order: torch.Tensor) -> Iterator[torch.Tensor]:
        """This rank's items of every global batch of ``order`` (empty parts are skipped)."""
        for start in range(0, self.n, self.batch_size):
            chunk = order[start : start + self.batch_size]
            if len(chunk) < self.batch_size and self.drop_last:
                return
            part = rank_share(chunk, order, self.rank, self.world_size, self.pad)
            if len(part):
                yield part

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._own_epoch
        start = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            start = self._resume["position"]
        self._resume = None
        self._iter_epoch, self._consumed = epoch, start
        for b, items in enumerate(self.rank_batches(self.epoch_order(epoch))):
            if b >= start:
                yield self.make_batch(items)
        if self.epoch_fn is None:
            self._own_epoch += 1

    def mark_consumed(self) -> tuple[int, int]:
        """A batch reached the model: returns its ``(epoch, index within the epoch)``."""
        self._consumed += 1
        return self._iter_epoch, self._consumed - 1

    # Lightning calls these for stateful dataloaders: exact mid-epoch resumption.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._iter_epoch, "position": self._consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "position": int(state["position"])}


# -- gathering -------------------------------------------------------------------------------
class _GatherRows(Function):
    """``all_gather`` of equally shaped tensors, concatenated; backward hands every rank the sum
    over ranks of the gradient of its own rows (the gradient of the sum of all ranks' losses,
    which DDP then averages like any other gradient).

    Not ``torch.distributed.nn.functional.all_gather``: the installed torch (2.14) deprecates it
    with a FutureWarning on every call (MYOW gathers every step), pointing to the private
    ``torch.distributed._functional_collectives``; and on gloo its backward emulates
    reduce-scatter with an all-to-all plus a sum, where one all-reduce does here."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_from_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` of every rank concatenated in rank order along dim 0, and each row's rank.

    Ranks may hold different numbers of rows. Gradients flow back to the rank each row came
    from (MYOW's candidates need none: they are target-network outputs). Outside a process
    group: ``x`` itself, every row from rank 0.
    """
    _, world = rank_and_world()
    if world == 1:
        return x, torch.zeros(len(x), dtype=torch.long, device=x.device)
    size = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = x if len(x) == longest else torch.cat([x, x.new_zeros(longest - len(x), *x.shape[1:])])
    gathered = _GatherRows.apply(padded).split(longest)
    rows = torch.cat([part[:c] for part, c in zip(gathered, counts)])
    origin = torch.repeat_interleave(torch.arange(world, device=x.device), torch.tensor(counts, device=x.device))
    return rows, origin
