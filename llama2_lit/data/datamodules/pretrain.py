"""Pretraining data (paper section 2.2): text documents, tokenized once into a cache, packed into
fixed-length sequences."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from llama2_lit.config import IGNORE_INDEX
from llama2_lit.data.datamodules.common import (
    _as_list, _StageDataModule, document_attention, document_positions, in_validation_split,
)
from llama2_lit.data.records import load_records
from llama2_lit.files import file_sha256
from llama2_lit.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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

    Attention across documents (the paper does not say): by default a window
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
