"""A DataLoader whose position can be saved and restored, for exact resume of a training run.

Why: a run stopped at step k and resumed from its checkpoint must see exactly the batches the
uninterrupted run would have seen from step k on — otherwise "resume" silently changes the data
order (repeats some examples, skips others) and the two runs' losses diverge.

How Lightning (2.6) uses it (``loops/fit_loop.py``, ``loops/training_epoch_loop.py``):

- When a checkpoint is written, ``FitLoop.on_save_checkpoint`` stores ``loader.state_dict()`` of
  every train loader that has ``state_dict``/``load_state_dict``. With a sized loader Lightning
  does not prefetch, so at that moment the loader has handed out exactly the batches that were
  trained on. With worker processes, the DataLoader itself prefetches from the sampler; so the
  position here is counted where batches are handed to the consumer (``__iter__`` below), never
  in the sampler.
- On resume, ``FitLoop.setup_data`` calls ``load_state_dict`` *before* ``iter()``; then
  ``on_advance_start`` calls ``sampler.set_epoch(current_epoch)``; then the first batch is
  fetched. Lightning expects a resumable loader to yield only the *rest* of the epoch while
  ``len()`` stays the full epoch length (it adds the batches already done to its own count).

The position is ``(epoch, batches_consumed)``. The order of an epoch is a permutation drawn from
a generator seeded with ``seed + epoch`` (the ``DistributedSampler`` convention), so it can be
recomputed from the state alone, and the first ``batches_consumed`` batches are skipped without
loading them. A new ``iter()`` starts the next epoch when the current one was fully consumed,
and otherwise continues where the consumer stopped; ``set_epoch(e)`` (called by Lightning at
each epoch start) jumps to the start of epoch ``e`` unless already in it.

The sampler is a ``DistributedSampler`` subclass, so Lightning does not replace it under DDP or
FSDP (it only injects its own sampler into loaders whose sampler is not one). Each rank reads
every ``num_replicas``-th example of the epoch's order, as ``DistributedSampler`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffles with ``seed + epoch``, splits across ranks, and skips what was already consumed.

    Args:
        dataset: any sized dataset.
        batch_size: the loader's batch size (the skip is counted in batches).
        shuffle: a new permutation per epoch; False reads the examples in order.
        seed: base seed of the permutations.
        drop_last: drop the tail so that every rank gets the same number of examples (otherwise
            the tail is padded with examples from the start, as ``DistributedSampler`` does).
        num_replicas, rank: data-parallel world; by default read from ``torch.distributed`` when
            it is initialised, else 1 and 0.
    """

    def __init__(self, dataset: Sized, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank,  # type: ignore[arg-type]
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.batches_consumed = 0
        """Batches of the current epoch already handed to the consumer (by ``ResumableDataLoader``)."""

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's example indices for ``epoch``, in order, before any skipping."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > n:
            repeats = -(-self.total_size // max(n, 1))
            order = (order * repeats)[: self.total_size]
        return order[self.rank: self.total_size: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order(self.epoch)[self.batches_consumed * self.batch_size:])

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``; a no-op if already in it (e.g. after ``load_state_dict``)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_consumed = 0


class ResumableDataLoader(DataLoader):
    """A map-style DataLoader with ``state_dict``/``load_state_dict`` (see the module docstring).

    Args:
        dataset: a sized map-style dataset.
        batch_size: examples per batch (per rank).
        shuffle: shuffle each epoch with ``seed + epoch``.
        seed: base seed.
        drop_last: drop the last incomplete batch.
        collate_fn: builds a batch from a list of examples.
        num_workers, pin_memory, persistent_workers: as ``torch.utils.data.DataLoader``.
        num_replicas, rank: data-parallel world (default: from ``torch.distributed``).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, collate_fn: Callable[[list[Any]], Any] | None = None,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        sampler = ResumableSampler(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                                   drop_last=drop_last, num_replicas=num_replicas, rank=rank)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                         collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=persistent_workers and num_workers > 0)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch  # type: ignore[attr-defined]

    @property
    def batches_consumed(self) -> int:
        return self.sampler.batches_consumed  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # A generator: nothing below runs until the first batch is requested, i.e. after
        # Lightning's load_state_dict() and set_epoch() calls that follow iter().
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if sampler.batches_consumed >= len(self):
            sampler.epoch += 1
            sampler.batches_consumed = 0
        for batch in super().__iter__():
            # Counted when handed over, not when prefetched by workers.
            sampler.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches consumed in it, plus what must match on resume."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {
            "epoch": sampler.epoch,
            "batches_consumed": sampler.batches_consumed,
            "seed": sampler.seed,
            "shuffle": sampler.shuffle,
            "batch_size": sampler.batch_size,
            "num_examples": len(self.dataset),  # type: ignore[arg-type]
            "num_replicas": sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``; the data and sampling settings must match."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        current = self.state_dict()
        mismatched = [
            f"{key}: checkpoint {state_dict[key]!r}, now {current[key]!r}"
            for key in ("seed", "shuffle", "batch_size", "num_examples", "num_replicas")
            if key in state_dict and state_dict[key] != current[key]
        ]
        if mismatched:
            raise ValueError(
                "cannot resume the data loader exactly: the data or its settings changed since the "
                "checkpoint was written (" + "; ".join(mismatched) + ")"
            )
        sampler.epoch = int(state_dict["epoch"])
        sampler.batches_consumed = int(state_dict["batches_consumed"])
