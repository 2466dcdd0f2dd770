"""LightningDataModules for every stage: pretraining text, SFT dialogs, preference pairs, RL prompts.

Data flows one way: record files (``llama2_lit.data.records``, validated there) -> token ids
(``llama2_lit.tokenizer`` and the chat format of ``llama2_lit.chat``) -> the batches below.

Batch formats (dicts of tensors; the contract every stage module reads):

- ``PretrainDataModule`` and ``SFTDataModule``: ``input_ids`` (B, T) long; ``labels`` (B, T) long,
  already shifted: ``labels[b, t]`` is the target of the logits at position ``t``, ``-100`` means
  no loss. With document masks (pretraining ``document_mask=True``, SFT ``packing=True``) also
  ``attention_mask`` (B, T, T) bool, True where query ``t`` may attend key ``s`` (block-diagonal
  and causal), and ``position_ids`` (B, T) long, restarting at 0 at each document. Without them,
  plain causal attention is right: rows are either full or right-padded, and causal attention
  never looks right, so a padding mask would change nothing (and would cost SDPA's fast path).
- ``PreferenceDataModule``: ``chosen_input_ids``, ``chosen_attention_mask``,
  ``rejected_input_ids``, ``rejected_attention_mask`` (B, T) long, right-padded to one common T;
  ``rating`` (B,) long, index into ``records.RATINGS`` (-1 when unknown, e.g. HH-RLHF: margin 0);
  ``chosen_safe``, ``rejected_safe`` (B,) long (1 safe, 0 unsafe, -1 unknown); validation
  batches from ``val_files`` also carry ``source`` (B,) long, the index of each pair's file.
- ``PromptsDataModule``: ``input_ids``, ``attention_mask`` (B, T) long, LEFT-padded (every prompt
  ends at the last column, ready to generate); ``is_safety`` (B,) bool; ``messages`` and ``meta``
  as python lists (one entry per row, for the oracle judge).

Padding positions hold token id 0 (Llama 2 has no pad id): they are never targets (-100), and no
real token attends to them.

Every train loader is a ``ResumableDataLoader``: the order depends only on ``seed`` and the
epoch, and its position is saved in Lightning checkpoints, so a resumed run sees exactly the
batches the uninterrupted run would have seen (``llama2_lit/data/loader.py``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from llama2_lit.chat import DialogTooLongError, EncodedDialog, encode_dialog, encode_prompt
from llama2_lit.data.loader import ResumableDataLoader
from llama2_lit.data.records import load_records, rating_index
from llama2_lit.tokenizer import Tokenizer, pad_batch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions that carry no loss (``torch.nn.functional.cross_entropy``'s default)."""
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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        return ResumableDataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=True, seed=self.seed,  # type: ignore[arg-type]
            collate_fn=self.collate_fn, num_workers=self.num_workers,
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
# Pretraining


def read_text_documents(path: str | Path) -> list[str]:
    """The documents of a pretraining file, as ``llama2_lit.data.records`` defines them: in a plain
    ``.txt`` file (the toy world's ``corpus_*.txt``) a document is a block of lines separated by
    blank lines; in a JSONL/JSON/Parquet file it is one ``text`` record."""
    return [record["text"] for record in load_records(path, "text")]


def default_cache_dir() -> str:
    """``$LLAMA2_LIT_CACHE``; else ``data/cache`` of a source checkout (git-ignored, beside the
    toy world in ``data/world``); else ``~/.cache/llama2_lit``."""
    if os.environ.get("LLAMA2_LIT_CACHE"):
        return os.environ["LLAMA2_LIT_CACHE"]
    repository = Path(__file__).resolve().parents[2]
    if (repository / "pyproject.toml").is_file() and (repository / "llama2_lit").is_dir():
        return str(repository / "data" / "cache")
    return str(Path.home() / ".cache" / "llama2_lit")


@dataclass
class PretrainCache:
    """Token streams of the train and validation documents, ``[BOS] doc [EOS]`` concatenated."""

    directory: Path
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    info: dict[str, Any]
    built: bool
    """True when this call tokenized the corpus; False when it was read from the cache."""


def _cache_key(tokenizer_path: str, train_files: Sequence[str], val_files: Sequence[str],
               settings: dict[str, Any]) -> str:
    description = {
        "format": 1,
        "tokenizer": file_sha256(tokenizer_path),
        "train": [file_sha256(path) for path in train_files],
        "val": [file_sha256(path) for path in val_files],
        **settings,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def build_pretrain_cache(tokenizer_path: str, train_files: Sequence[str], val_files: Sequence[str] = (),
                         *, cache_dir: str | Path, val_fraction: float = 0.0) -> PretrainCache:
    """Tokenize a pretraining corpus once and keep the result.

    The cache folder is named by a hash of the tokenizer file, the contents of every input file
    and the settings, so any change to them builds a new one, and an unchanged corpus is never
    tokenized twice. It is written to a temporary folder and renamed into place: an interrupted
    build leaves nothing that could be mistaken for a cache. Token streams are ``.npy`` files
    read with memory mapping (uint16 when the vocabulary fits, else int32).

    Validation documents come from ``val_files``, or, when there are none, from the training
    files: a document is held out when the hash of its text falls under ``val_fraction``.
    """
    for path in [*train_files, *val_files]:
        if not Path(path).is_file():  # hashed for the cache key: local files only
            raise FileNotFoundError(f"pretraining file not found: {path}")
    if not train_files:
        raise ValueError("no training files given")
    if val_files and val_fraction > 0:
        raise ValueError("give either val_files or val_fraction, not both")
    settings = {"val_fraction": val_fraction}
    key = _cache_key(tokenizer_path, train_files, val_files, settings)
    directory = Path(cache_dir) / f"pretrain-{key}"
    if not (directory / "info.json").is_file():
        _write_pretrain_cache(directory, tokenizer_path, train_files, val_files, settings)
        built = True
    else:
        built = False
    info = json.loads((directory / "info.json").read_text())
    return PretrainCache(
        directory=directory,
        train_tokens=np.load(directory / "train.npy", mmap_mode="r"),
        val_tokens=np.load(directory / "val.npy", mmap_mode="r"),
        info=info,
        built=built,
    )


def _write_pretrain_cache(directory: Path, tokenizer_path: str, train_files: Sequence[str],
                          val_files: Sequence[str], settings: dict[str, Any]) -> None:
    tokenizer = Tokenizer(tokenizer_path)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    val_fraction = settings["val_fraction"]
    train_docs: list[str] = []
    val_docs: list[str] = []
    for path in train_files:
        for document in read_text_documents(path):
            (val_docs if in_validation_split(document, val_fraction) else train_docs).append(document)
    for path in val_files:
        val_docs.extend(read_text_documents(path))
    if not train_docs:
        raise ValueError(f"no training documents in {list(train_files)}")

    def stream(documents: list[str]) -> np.ndarray:
        # One small array per document (2 bytes a token), not python lists of ints (~36 bytes a token).
        arrays = [np.asarray(tokenizer.encode(document, bos=True, eos=True), dtype=dtype) for document in documents]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

    train_tokens, val_tokens = stream(train_docs), stream(val_docs)
    info = {
        "tokenizer_path": str(tokenizer_path), "train_files": list(map(str, train_files)),
        "val_files": list(map(str, val_files)), **settings,
        "train_documents": len(train_docs), "val_documents": len(val_docs),
        "train_tokens": int(train_tokens.size), "val_tokens": int(val_tokens.size),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        np.save(staging / "train.npy", train_tokens)
        np.save(staging / "val.npy", val_tokens)
        (staging / "info.json").write_text(json.dumps(info, indent=2))
        try:
            os.replace(staging, directory)
        except OSError:
            if not (directory / "info.json").is_file():  # not a concurrent build of the same cache
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("tokenized %d documents (%d tokens) into %s", len(train_docs) + len(val_docs),
             train_tokens.size + val_tokens.size, directory)


class PackedTokenDataset(Dataset):
    """Fixed-length windows over a token stream: example ``i`` reads tokens
    ``[i*T, (i+1)*T]`` (T+1 tokens) as inputs ``[:-1]`` and targets ``[1:]``, so every token after the
    first is a target exactly once; the incomplete tail window is dropped."""

    def __init__(self, tokens: np.ndarray, seq_len: int, bos_id: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens, self.seq_len, self.bos_id = tokens, seq_len, bos_id

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens[start: start + self.seq_len + 1], dtype=np.int64))
        labels = window[1:].clone()
        # BOS is given, never predicted: the step from one document's EOS to the next BOS is no target.
        labels[labels == self.bos_id] = IGNORE_INDEX
        return {"input_ids": window[:-1], "labels": labels}


class PretrainCollate:
    """Stacks windows; with ``document_mask`` adds the block-diagonal mask and reset positions."""

    def __init__(self, bos_id: int, document_mask: bool) -> None:
        self.bos_id, self.document_mask = bos_id, document_mask

    def __call__(self, examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch = {key: torch.stack([example[key] for example in examples]) for key in ("input_ids", "labels")}
        if self.document_mask:
            # A document starts at each BOS (the tokenizer never emits BOS from text).
            is_start = batch["input_ids"] == self.bos_id
            batch["attention_mask"] = document_attention(is_start.long().cumsum(-1))
            batch["position_ids"] = document_positions(is_start)
        return batch


class PretrainDataModule(_StageDataModule):
    """Next-token prediction on packed text (paper section 2.2).

    Every document is encoded as ``[BOS] text [EOS]``; documents are concatenated in file order
    into one token stream, cut into fixed windows of ``seq_len`` tokens (the stream is tokenized
    once and cached, see ``build_pretrain_cache``); windows are shuffled with ``seed + epoch``.

    A document is what ``llama2_lit.data.records`` reads as one ``text`` record: in a ``.txt``
    file (the toy world's ``corpus_train.txt``/``corpus_val.txt``) a block of lines separated by
    blank lines; in a JSONL/JSON/Parquet file one ``{"text": ...}`` record.

    Attention across documents (the paper does not say; spec section 3 [NS]): by default a window
    is one sequence under plain causal attention, so a token may attend to the end of the
    previous document, across the EOS/BOS separator — the common practice (GPT-2/3, Llama 1/2
    reproductions; the Llama 3 report found masking made little difference in standard
    pretraining and mattered only for very long sequences). ``document_mask=True`` instead
    confines attention to each document (block-diagonal causal mask) and restarts positions at
    each BOS, so the two can be compared; it costs a (B, T, T) mask and SDPA's fused causal
    kernel. In both cases a BOS is never a target: the start of a document is given.

    Args:
        tokenizer_path: SentencePiece model file.
        train_files: ``.txt`` files (documents separated by blank lines) or JSONL/JSON/Parquet
            files of ``text`` records.
        val_files: held-out files in the same formats. Without them, ``val_fraction`` of the
            training documents (chosen by a hash of their text) is held out.
        seq_len: tokens per training sequence.
        batch_size: sequences per batch (per device).
        val_batch_size: sequences per validation batch; default ``batch_size``.
        val_fraction: fraction of training documents held out when no ``val_files`` are given.
        document_mask: attend only within documents and restart positions at each BOS.
        cache_dir: where tokenized corpora are cached; default ``$LLAMA2_LIT_CACHE``, else
            ``data/cache`` of the source checkout (git-ignored), else ``~/.cache/llama2_lit``.
        seed: seed of the shuffling (epoch ``e`` uses ``seed + e``).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer_path: str,
        train_files: list[str],
        val_files: list[str] | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        val_fraction: float = 0.0,
        document_mask: bool = False,
        cache_dir: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(tokenizer_path=tokenizer_path, batch_size=batch_size, val_batch_size=val_batch_size,
                         seed=seed, num_workers=num_workers)
        self.save_hyperparameters()  # stored in checkpoints next to the loader's position
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.train_files = _as_list(train_files)
        self.val_files = _as_list(val_files)
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.document_mask = document_mask
        self.cache_dir = cache_dir or default_cache_dir()
        self.cache: PretrainCache | None = None

    def _build_cache(self) -> PretrainCache:
        return build_pretrain_cache(self.tokenizer_path, self.train_files, self.val_files, cache_dir=self.cache_dir,
                                    val_fraction=self.val_fraction)

    def prepare_data(self) -> None:
        """Tokenize and cache the corpus (Lightning runs this on one process per node)."""
        self._build_cache()

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        self.cache = self._build_cache()
        bos = self.tokenizer.bos_id
        self.train_dataset = PackedTokenDataset(self.cache.train_tokens, self.seq_len, bos)
        self.val_dataset = PackedTokenDataset(self.cache.val_tokens, self.seq_len, bos)
        self.collate_fn = PretrainCollate(bos, self.document_mask)
        has_val = bool(self.val_files) or self.val_fraction > 0
        if has_val and len(self.val_dataset) == 0:
            raise ValueError(
                f"the validation text has {self.cache.val_tokens.size} tokens, fewer than one sequence of "
                f"seq_len + 1 = {self.seq_len + 1}: give more validation text or a shorter seq_len"
            )


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
    """A DataModule over record files (chat, preference, prompts): mixture, split, encoding."""

    kind: str = ""

    def __init__(self, *, tokenizer_path: str, train_files: list[str], train_weights: list[float] | None,
                 val_files: list[str] | None, val_fraction: float, skip_too_long: bool, batch_size: int,
                 val_batch_size: int | None, seed: int, num_workers: int) -> None:
        super().__init__(tokenizer_path=tokenizer_path, batch_size=batch_size, val_batch_size=val_batch_size,
                         seed=seed, num_workers=num_workers)
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
        raise NotImplementedError

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


# ================================================================================================
# Supervised fine-tuning


class SFTCollate:
    """Right-pads dialogs (or packs of dialogs, with document masks and reset positions)."""

    def __init__(self, packed: bool) -> None:
        self.packed = packed

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        input_ids, real = pad_batch([e["input_ids"] for e in examples], side="right", pad_value=PAD_TOKEN)
        labels, _ = pad_batch([e["labels"] for e in examples], side="right", pad_value=IGNORE_INDEX)
        batch = {"input_ids": input_ids, "labels": labels}
        if self.packed:
            is_start = torch.zeros_like(input_ids, dtype=torch.bool)
            for row, example in enumerate(examples):
                is_start[row, example["document_starts"]] = True
            # The padding of a row is one more block: every query must see some key (a softmax
            # over nothing is NaN), and padding must see only padding.
            is_start[:, 1:] |= (real[:, 1:] == 0) & (real[:, :-1] == 1)
            batch["attention_mask"] = document_attention(is_start.long().cumsum(-1))
            batch["position_ids"] = document_positions(is_start)
        return batch


class SFTDataModule(_RecordsDataModule):
    """Chat dialogs for supervised fine-tuning (paper section 3.1).

    Each dialog is encoded in the Llama 2 chat format by ``llama2_lit.chat.encode_dialog``, whose
    loss mask is 1 on assistant tokens and their EOS; ``labels[t]`` is the next token where that
    token is in the mask, else -100 ("we zero-out the loss on tokens from the user prompt").
    ``loss_on="last_assistant"`` keeps only the last answer (Ghost Attention, section 3.3).

    A dialog longer than ``max_seq_len`` loses its earliest exchanges (the chat module's policy:
    answers are never cut, the system prompt moves to the new first turn); one whose last
    exchange alone does not fit is skipped and counted (``skip_too_long``) or is an error.

    Packing ("we concatenate all the prompts and answers from the training set", section 3.1):
    the training dialogs are shuffled with ``seed`` once, then each, in that order, goes into the
    fullest sequence that still has room for it (best fit: about 98% of positions are real tokens
    on the toy world at 512, against 84% for simply filling one sequence after another) —
    sequences of at most ``max_seq_len`` tokens, never splitting a dialog. Each dialog attends only
    to itself (block-diagonal causal mask) and its positions start at 0, so a packed batch
    computes exactly what the same dialogs unpacked compute: no cross-example contamination
    (llama-recipes issue #341).

    Args:
        tokenizer_path: SentencePiece model file.
        train_files: files of ``chat`` records (JSONL/JSON/Parquet, or a hub id).
        train_weights: mixture weights, one per train file: how many times each file is used per
            epoch (2.0 = twice, 0.5 = a random half drawn with ``seed``). Default 1.0 each.
        val_files: held-out ``chat`` files. Without them, ``val_fraction`` of the training
            dialogs (chosen by a hash of the record) is held out.
        val_fraction: fraction of dialogs held out when no ``val_files`` are given.
        max_seq_len: longest sequence in tokens (a dialog, or a pack when packing).
        batch_size: sequences per batch (per device).
        val_batch_size: sequences per validation batch; default ``batch_size``.
        loss_on: ``all_assistant``, or ``last_assistant`` (Ghost Attention).
        packing: pack several dialogs per sequence, with document masks.
        skip_too_long: skip (and count) dialogs that cannot fit ``max_seq_len``; False: error.
        seed: seed of the mixture, the packing and the shuffling (epoch ``e`` uses ``seed + e``).
        num_workers: DataLoader worker processes.
    """

    kind = "chat"

    def __init__(
        self,
        tokenizer_path: str,
        train_files: list[str],
        train_weights: list[float] | None = None,
        val_files: list[str] | None = None,
        val_fraction: float = 0.0,
        max_seq_len: int = 512,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        loss_on: Literal["all_assistant", "last_assistant"] = "all_assistant",
        packing: bool = False,
        skip_too_long: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(tokenizer_path=tokenizer_path, train_files=train_files, train_weights=train_weights,
                         val_files=val_files, val_fraction=val_fraction, skip_too_long=skip_too_long,
                         batch_size=batch_size, val_batch_size=val_batch_size, seed=seed, num_workers=num_workers)
        self.save_hyperparameters()
        if loss_on not in ("all_assistant", "last_assistant"):
            raise ValueError(f"loss_on must be 'all_assistant' or 'last_assistant', got {loss_on!r}")
        self.max_seq_len = max_seq_len
        self.loss_on = loss_on
        self.packing = packing
        self.packing_efficiency: float | None = None
        """Fraction of the packed training positions that hold real tokens; set by ``setup``."""

    def encode(self, record: dict[str, Any]) -> dict[str, list[int]]:
        """One ``chat`` record as ``input_ids`` and shifted ``labels``."""
        encoded = encode_dialog(self.tokenizer, record["messages"], loss_on=self.loss_on, max_len=self.max_seq_len)
        return {"input_ids": list(encoded.ids), "labels": dialog_labels(encoded.ids, encoded.loss_mask)}

    def pack(self, examples: list[dict[str, Any]], shuffle_seed: int | None) -> list[dict[str, Any]]:
        """Packs of whole dialogs (in shuffled order when ``shuffle_seed`` is given)."""
        if shuffle_seed is not None:
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
            examples = [examples[i] for i in order]
        packs = []
        for members in best_fit_packing([len(e["input_ids"]) for e in examples], self.max_seq_len):
            starts, offset = [], 0
            for i in members:
                starts.append(offset)
                offset += len(examples[i]["input_ids"])
            packs.append({
                "input_ids": [token for i in members for token in examples[i]["input_ids"]],
                "labels": [label for i in members for label in examples[i]["labels"]],
                "document_starts": starts,
            })
        return packs

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train, val = self._encoded_splits()
        if self.packing:
            train, val = self.pack(train, shuffle_seed=self.seed), self.pack(val, shuffle_seed=None)
            if train:
                self.packing_efficiency = sum(len(p["input_ids"]) for p in train) / (len(train) * self.max_seq_len)
        self.train_dataset = ListDataset(train)
        self.val_dataset = ListDataset(val)
        self.collate_fn = SFTCollate(self.packing)


# ================================================================================================
# Preference pairs (reward models)


def _safety_label(value: Any) -> int:
    return -1 if value is None else int(bool(value))


def drop_exchanges(prompt: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """The prompt without its first ``count`` (user, assistant) exchanges, the system message kept
    (``encode_dialog`` merges it into the new first user turn, as its own long-dialog policy does)."""
    system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    return system + prompt[len(system) + 2 * count:]


class PreferenceCollate:
    """Right-pads chosen and rejected sequences to one common length."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        width = max(max(len(e["chosen"]), len(e["rejected"])) for e in examples)
        chosen, chosen_mask = pad_batch([e["chosen"] for e in examples], side="right", pad_value=PAD_TOKEN,
                                        pad_to=width)
        rejected, rejected_mask = pad_batch([e["rejected"] for e in examples], side="right", pad_value=PAD_TOKEN,
                                            pad_to=width)
        return {
            "chosen_input_ids": chosen,
            "chosen_attention_mask": chosen_mask,
            "rejected_input_ids": rejected,
            "rejected_attention_mask": rejected_mask,
            "rating": torch.tensor([e["rating"] for e in examples], dtype=torch.long),
            "chosen_safe": torch.tensor([e["chosen_safe"] for e in examples], dtype=torch.long),
            "rejected_safe": torch.tensor([e["rejected_safe"] for e in examples], dtype=torch.long),
            **({"source": torch.tensor([e["source"] for e in examples], dtype=torch.long)}
               if all("source" in e for e in examples) else {}),
        }


class PreferenceDataModule(_RecordsDataModule):
    """Preference pairs for the reward models (paper section 3.2.2).

    Chosen and rejected are each encoded as the finished dialog ``prompt + [assistant: response]``
    by ``llama2_lit.chat.encode_dialog``, so the reward model reads exactly the chat format the
    policy writes, EOS included (its score is read at the last real token). When a pair is too
    long, both sides lose the same earliest exchanges, so both responses are judged in the same
    context.

    Args:
        tokenizer_path: SentencePiece model file.
        train_files: files of ``preference`` records.
        train_weights: mixture weights, one per train file (see ``SFTDataModule``), e.g. a 90/10
            safety/helpfulness mix for the safety RM (paper section 3.2.2).
        val_files: held-out ``preference`` files. Without them, ``val_fraction`` of the training
            pairs (chosen by a hash of the record) is held out.
        val_fraction: fraction of pairs held out when no ``val_files`` are given.
        max_seq_len: longest dialog in tokens.
        batch_size: pairs per batch (per device); the model reads 2 x batch_size sequences.
        val_batch_size: pairs per validation batch; default ``batch_size``.
        skip_too_long: skip (and count) pairs that cannot fit ``max_seq_len``; False: error.
        seed: seed of the mixture and the shuffling (epoch ``e`` uses ``seed + e``).
        num_workers: DataLoader worker processes.
    """

    kind = "preference"

    def __init__(
        self,
        tokenizer_path: str,
        train_files: list[str],
        train_weights: list[float] | None = None,
        val_files: list[str] | None = None,
        val_fraction: float = 0.0,
        max_seq_len: int = 512,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        skip_too_long: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(tokenizer_path=tokenizer_path, train_files=train_files, train_weights=train_weights,
                         val_files=val_files, val_fraction=val_fraction, skip_too_long=skip_too_long,
                         batch_size=batch_size, val_batch_size=val_batch_size, seed=seed, num_workers=num_workers)
        self.save_hyperparameters()
        self.max_seq_len = max_seq_len

    def encode(self, record: dict[str, Any]) -> dict[str, Any]:
        """One ``preference`` record: ids of both finished dialogs, rating index, safety labels."""

        def finished(prompt: list[dict[str, str]], response: str) -> EncodedDialog:
            messages = [*prompt, {"role": "assistant", "content": response}]
            return encode_dialog(self.tokenizer, messages, loss_on="last_assistant",  # type: ignore[arg-type]
                                 max_len=self.max_seq_len)

        chosen = finished(record["prompt"], record["chosen"])
        rejected = finished(record["prompt"], record["rejected"])
        if chosen.dropped_exchanges != rejected.dropped_exchanges:
            prompt = drop_exchanges(record["prompt"], max(chosen.dropped_exchanges, rejected.dropped_exchanges))
            chosen, rejected = finished(prompt, record["chosen"]), finished(prompt, record["rejected"])
        return {
            "chosen": list(chosen.ids),
            "rejected": list(rejected.ids),
            "rating": rating_index(record["rating"]),
            "chosen_safe": _safety_label(record.get("chosen_safe")),
            "rejected_safe": _safety_label(record.get("rejected_safe")),
        }

    def _encode_into(self, out: list[Any], record: dict[str, Any], path: str, number: int) -> None:
        before = len(out)
        super()._encode_into(out, record, path, number)
        if len(out) > before:
            self._encoded_from.append(path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self._encoded_from: list[str] = []
        train, val = self._encoded_splits()
        if self.val_files:
            # A validation pair remembers its file (batch key ``source``), so metrics can be split by
            # file. The validation files are encoded last, so they are the last len(val) encoded.
            for example, path in zip(val, self._encoded_from[len(self._encoded_from) - len(val):]):
                example["source"] = self.val_files.index(path)
        self.train_dataset = ListDataset(train)
        self.val_dataset = ListDataset(val)
        self.collate_fn = PreferenceCollate()


# ================================================================================================
# Prompts (rejection sampling, PPO, evaluation)


def collate_prompts(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Left-pads prompt ids; carries the raw dialogs and their metadata as python lists."""
    input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], side="left", pad_value=PAD_TOKEN)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "is_safety": torch.tensor([e["is_safety"] for e in examples], dtype=torch.bool),
        "messages": [e["messages"] for e in examples],
        "meta": [e["meta"] for e in examples],
    }


class PromptsDataModule(_RecordsDataModule):
    """Prompts to sample responses for (rejection sampling and PPO, paper section 3.2.3).

    Each prompt dialog (ending with a user turn) is encoded by ``llama2_lit.chat.encode_prompt``,
    ready for generation, and left-padded so that every row ends at the last column. The safety
    tag (PPO scores safety prompts with the safety RM) and the raw messages and metadata (for the
    oracle judge) travel with the batch.

    Args:
        tokenizer_path: SentencePiece model file.
        train_files: files of ``prompts`` records.
        train_weights: mixture weights, one per train file (see ``SFTDataModule``).
        val_files: held-out ``prompts`` files. Without them, ``val_fraction`` of the training
            prompts (chosen by a hash of the record) is held out.
        val_fraction: fraction of prompts held out when no ``val_files`` are given.
        max_prompt_len: longest prompt in tokens (earliest exchanges are dropped to fit; leave
            room for the response within the model's context).
        batch_size: prompts per batch (per device).
        val_batch_size: prompts per validation batch; default ``batch_size``.
        skip_too_long: skip (and count) prompts that cannot fit ``max_prompt_len``; False: error.
        seed: seed of the mixture and the shuffling (epoch ``e`` uses ``seed + e``).
        num_workers: DataLoader worker processes.
    """

    kind = "prompts"

    def __init__(
        self,
        tokenizer_path: str,
        train_files: list[str],
        train_weights: list[float] | None = None,
        val_files: list[str] | None = None,
        val_fraction: float = 0.0,
        max_prompt_len: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        skip_too_long: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(tokenizer_path=tokenizer_path, train_files=train_files, train_weights=train_weights,
                         val_files=val_files, val_fraction=val_fraction, skip_too_long=skip_too_long,
                         batch_size=batch_size, val_batch_size=val_batch_size, seed=seed, num_workers=num_workers)
        self.save_hyperparameters()
        self.max_prompt_len = max_prompt_len

    def encode(self, record: dict[str, Any]) -> dict[str, Any]:
        """One ``prompts`` record: prompt ids, safety tag, raw messages and metadata."""
        ids = encode_prompt(self.tokenizer, record["messages"], max_len=self.max_prompt_len)  # type: ignore[arg-type]
        return {"input_ids": list(ids), "is_safety": bool(record.get("is_safety", False)),
                "messages": record["messages"], "meta": record.get("meta") or {}}

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train, val = self._encoded_splits()
        self.train_dataset = ListDataset(train)
        self.val_dataset = ListDataset(val)
        self.collate_fn = collate_prompts
