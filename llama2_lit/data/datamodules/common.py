"""What the stage DataModules share: the pure functions (labels, document masks, packing, splitting,
mixing) and the plumbing (tokenizer, loaders, record files: mixture, split, encoding)."""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from llama2_lit.chat import DialogTooLongError
from llama2_lit.config import IGNORE_INDEX
from llama2_lit.data.loader import ResumableDataLoader
from llama2_lit.data.records import load_records
from llama2_lit.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PAD_TOKEN = 0
"""Placeholder id in padded positions; never attended, never a target (Llama 2 has no pad id)."""

T = TypeVar("T")


# ================================================================================================
# Pure functions: labels, document masks, packing, splitting, mixing


def dialog_labels(ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """Shifted labels of one encoded dialog: ``labels[t] = ids[t+1]`` where ``loss_mask[t+1]`` is 1
    (an assistant token is the target), else ``IGNORE_INDEX``; the last position has no target."""
    if len(ids) != len(loss_mask):
        raise ValueError(f"ids ({len(ids)}) and loss_mask ({len(loss_mask)}) differ in length")
    return [ids[t + 1] if loss_mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def document_attention(document_ids: Tensor) -> Tensor:
    """Block-diagonal causal mask from per-position document ids.

    document_ids: (..., T) integers, equal within a document. Returns (..., T, T) bool, True where
    query ``t`` may attend key ``s``: ``s <= t`` and both in the same document.
    """
    seq = document_ids.shape[-1]
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return same & causal


def document_positions(is_start: Tensor) -> Tensor:
    """RoPE positions that restart at 0 at every document start.

    is_start: (..., T) bool, True at the first token of each document. Position 0 is always a
    start (a sequence that begins inside a document counts from there). Returns (..., T) long.
    """
    seq = is_start.shape[-1]
    index = torch.arange(seq, device=is_start.device).expand_as(is_start)
    start_of_current = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_of_current


def best_fit_packing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group items into bins of at most ``capacity`` tokens, never splitting an item.

    Best fit: each item, in the given order, goes into the fullest bin that still has room for
    it, or opens a new bin. Bins keep their items in arrival order and are returned in the order
    they were opened; returns lists of item indices.
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"item {index} has {length} tokens, more than the capacity of {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, target = free.pop(slot)
        else:
            room, target = capacity, len(bins)
            bins.append([])
        bins[target].append(index)
        bisect.insort(free, (room - length, target))
    return bins


def in_validation_split(key: str, val_fraction: float) -> bool:
    """Whether an item belongs to the validation split, decided by a hash of ``key`` alone.

    Independent of file order and of the other items, so appending data never moves an item from
    one split to the other, and exact duplicates always land on the same side (no leakage).
    """
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def mix_sources(sources: Sequence[Sequence[T]], weights: Sequence[float], seed: int) -> list[T]:
    """A data mixture: each source repeated ``weight`` times (2.0 = every item twice, 0.5 = a
    random half, drawn with ``seed``). The result is fixed for a seed; loaders shuffle it."""
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
    mixed: list[T] = []
    for index, (items, weight) in enumerate(zip(sources, weights)):
        if weight < 0:
            raise ValueError(f"mixture weight {index} is negative ({weight})")
        whole, fraction = int(weight), weight - int(weight)
        mixed.extend(list(items) * whole)
        extra = round(fraction * len(items))
        if extra:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            chosen = torch.randperm(len(items), generator=generator)[:extra].sort().values.tolist()
            mixed.extend(items[i] for i in chosen)
    return mixed


# ================================================================================================
# Shared DataModule plumbing


def _as_list(paths: str | Sequence[str] | None) -> list[str]:
    if paths is None:
        return []
    return [paths] if isinstance(paths, (str, Path)) else [str(p) for p in paths]


def _record_key(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


class _StageDataModule(L.LightningDataModule):
    """What the four DataModules share: tokenizer, loaders, train/val sources."""

    drop_last: bool = False
    """Drop each epoch's last, smaller training batch (PPO's prompts set it: whole iterations)."""

    def __init__(self, *, tokenizer_path: str, batch_size: int, val_batch_size: int | None, seed: int,
                 num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer_path = tokenizer_path
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self._tokenizer: Tokenizer | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")

    def train_dataloader(self) -> ResumableDataLoader:
        self._require_setup()
        if len(self.train_dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{type(self).__name__}: the training set is empty")
        if self.drop_last and len(self.train_dataset) < self.batch_size:  # type: ignore[arg-type]
            raise ValueError(f"{type(self).__name__}: {len(self.train_dataset)} training records "  # type: ignore[arg-type]
                             f"make no whole batch of {self.batch_size} (drop_last)")
        return ResumableDataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=True, seed=self.seed,  # type: ignore[arg-type]
            drop_last=self.drop_last, collate_fn=self.collate_fn, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if self.val_dataset is None or len(self.val_dataset) == 0:  # type: ignore[arg-type]
            return []  # Lightning skips validation
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=self.collate_fn, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


class ListDataset(Dataset):
    """Examples held in a python list (already tokenized)."""

    def __init__(self, examples: list[Any]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Any:
        return self.examples[index]


# ================================================================================================
# Record files: mixture, split, encoding


def _check_weights(weights: list[float] | None, files: list[str]) -> list[float]:
    if weights is None:
        return [1.0] * len(files)
    if len(weights) != len(files):
        raise ValueError(f"train_weights has {len(weights)} entries for {len(files)} train_files")
    if any(w < 0 for w in weights):
        raise ValueError(f"train_weights must be >= 0, got {weights}")
    return [float(w) for w in weights]


def _check_val(val_fraction: float, val_files: list[str]) -> float:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_files and val_fraction > 0:
        raise ValueError("give either val_files or val_fraction, not both")
    return val_fraction


class _RecordsDataModule(_StageDataModule):
    """A DataModule over record files (chat, preference, prompts): mixture, split, encoding.

    The options every record DataModule takes (a stage's own come first in its signature, these
    through ``**records``):

    Args:
        tokenizer_path: SentencePiece model file.
        train_files: record files (JSONL/JSON/Parquet, or a hub id) of the stage's ``kind``.
        train_weights: mixture weights, one per train file: how many times each file is used per
            epoch (2.0 = twice, 0.5 = a random half drawn with ``seed``). Default 1.0 each.
        val_files: held-out files of the same kind. Without them, ``val_fraction`` of the training
            records (chosen by a hash of the record) is held out.
        val_fraction: fraction of records held out when no ``val_files`` are given.
        batch_size: examples per batch (per device).
        val_batch_size: examples per validation batch; default ``batch_size``.
        skip_too_long: skip (and count) records that cannot fit the length limit; False: error.
        seed: seed of the mixture and the shuffling (epoch ``e`` uses ``seed + e``).
        num_workers: DataLoader worker processes.
    """

    kind: str = ""

    def __init__(self, tokenizer_path: str, train_files: list[str], train_weights: list[float] | None = None,
                 val_files: list[str] | None = None, val_fraction: float = 0.0, batch_size: int = 16,
                 val_batch_size: int | None = None, skip_too_long: bool = True, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__(tokenizer_path=tokenizer_path, batch_size=batch_size, val_batch_size=val_batch_size,
                         seed=seed, num_workers=num_workers)
        self.save_hyperparameters()  # Lightning collects the subclass's arguments too
        self.train_files = _as_list(train_files)
        if not self.train_files:
            raise ValueError("no train_files given")
        self.train_weights = _check_weights(train_weights, self.train_files)
        self.val_files = _as_list(val_files)
        self.val_fraction = _check_val(val_fraction, self.val_files)
        self.skip_too_long = skip_too_long
        self.skipped_too_long: list[str] = []
        """``"file, record N"`` of every dialog skipped because it does not fit; set by ``setup``."""

    def encode(self, record: dict[str, Any]) -> Any:
        """One record as a training example."""
        raise NotImplementedError

    def collate(self) -> Callable[[list[Any]], dict[str, Any]]:
        """The function that turns a list of examples into a batch."""
        raise NotImplementedError

    def arrange(self, train: list[Any], val: list[Any]) -> tuple[list[Any], list[Any]]:
        """The encoded splits as the datasets hold them (SFT packs them here); as they are by default."""
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train, val = self.arrange(*self._encoded_splits())
        self.train_dataset = ListDataset(train)
        self.val_dataset = ListDataset(val)
        self.collate_fn = self.collate()

    def _encoded_splits(self) -> tuple[list[Any], list[Any]]:
        """Encoded train examples (held-out ones removed), mixed by ``train_weights``; and the
        encoded validation examples. Encoding errors name the file and the record."""
        sources: list[list[Any]] = []
        held_out: list[Any] = []
        self.skipped_too_long = []
        for path in self.train_files:
            kept: list[Any] = []
            for number, record in enumerate(load_records(path, self.kind), start=1):
                held = self.val_fraction > 0 and in_validation_split(_record_key(record), self.val_fraction)
                self._encode_into(held_out if held else kept, record, path, number)
            sources.append(kept)
        val = held_out
        if self.val_files:
            val = []
            for path in self.val_files:
                for number, record in enumerate(load_records(path, self.kind), start=1):
                    self._encode_into(val, record, path, number)
        if self.skipped_too_long:
            log.warning("%s: skipped %d records that do not fit the length limit even after dropping earlier "
                        "exchanges (first: %s)", type(self).__name__, len(self.skipped_too_long),
                        self.skipped_too_long[0])
        train = mix_sources(sources, self.train_weights, self.seed)
        if not train:
            raise ValueError(f"{type(self).__name__}: no training examples left in {self.train_files} "
                             f"(held out: {len(held_out)}, too long: {len(self.skipped_too_long)}, weights: "
                             f"{self.train_weights})")
        return train, val

    def _encode_into(self, out: list[Any], record: dict[str, Any], path: str, number: int) -> None:
        try:
            out.append(self.encode(record))
        except DialogTooLongError as error:
            if not self.skip_too_long:
                raise ValueError(f"{path}, record {number}: {error}") from None
            self.skipped_too_long.append(f"{path}, record {number}")
        except ValueError as error:  # ChatFormatError is a ValueError
            raise ValueError(f"{path}, record {number}: {error}") from None
