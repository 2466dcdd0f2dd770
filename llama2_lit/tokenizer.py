"""SentencePiece tokenizer with Llama 2's conventions (paper section 2.2, "Tokenizer"; Meta's ``llama/tokenizer.py``).

Meta's wrapper: ``encode(s, bos, eos) = [BOS]*bos + sp.encode(s) + [EOS]*eos``; unk/bos/eos are
0/1/2 and there is **no pad id** (``pad_id == -1``). Padding is therefore never a token value in
this project: batches carry masks (``pad_batch``). A pad value is only a placeholder under a zero
mask; choosing ``pad == EOS`` and inferring padding from token values would drop EOS from the loss.

Training (``train_tokenizer``) uses Llama 2's trainer settings, read from Meta's ``tokenizer.model``
(``LLAMA2_TRAINER_SPEC``): BPE, digits split, byte fallback (ids 3..258 are ``<0x00>``..``<0xFF>``),
identity normaliser, dummy prefix, whitespace kept as is, whitespace-only pieces allowed, pieces of
at most 16 characters, character coverage 0.99995. The vocabulary size is the caller's (the course
sizes use ``config.COURSE_VOCAB_SIZE`` = 4096; Meta's is 32000).

Determinism: the same corpus and settings give a byte-identical model file (checked across fresh
processes). The BPE merge loop of sentencepiece is single-threaded and the pieces do not depend on
``num_threads`` (checked for 1 to 16), but the thread count is *recorded* in the file, so it has a
fixed default instead of the machine's core count. Text reaches the trainer through an iterator,
so no file name is recorded either. A corpus of more than ``input_sentence_size`` lines is sampled
by us with a fixed seed (sentencepiece's own sampling differs from process to process).

Round trip: with these settings (Meta's file and every tokenizer trained here), for every string
``s`` that UTF-8 can encode (no lone surrogates), ``decode(encode(s)) == s.replace("▁", " ")``.
Byte fallback covers characters missing from the vocabulary, the identity normaliser changes
nothing, and with ``remove_extra_whitespaces=False`` leading, trailing and repeated spaces are kept
(``decode`` removes exactly the one dummy-prefix space that ``encode`` added). The one loss is
U+2581 ("▁", LOWER ONE EIGHTH BLOCK): sentencepiece uses it as its own symbol for a space, so it
decodes as a space.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Literal

import sentencepiece as spm
import torch

log = logging.getLogger(__name__)

# Llama 2's trainer settings, as stored in the trainer_spec of Meta's tokenizer.model. The vocabulary
# size is left to the caller.
LLAMA2_TRAINER_SPEC: dict[str, object] = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    treat_whitespace_as_suffix=False,
    max_sentencepiece_length=16,
    max_sentence_length=4192,  # bytes; longer lines are skipped (counted in CorpusStats)
    input_sentence_size=200_000_000,
    shuffle_input_sentence=True,
    hard_vocab_limit=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,  # no pad piece
    unk_surface=" \u2047 ",
    vocabulary_output_piece_score=True,
)
DEFAULT_NUM_THREADS = 4  # recorded in the model file: a constant keeps the file machine-independent

PadSide = Literal["left", "right"]


class Tokenizer:
    """A loaded SentencePiece model (Meta's ``tokenizer.model`` or one we trained)."""

    def __init__(self, model_path: str | Path) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.path = model_path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{model_path}: not a SentencePiece model ({error})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for Llama 2: there is no pad token

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``text``; ``bos``/``eos`` are explicit, as in Meta's wrapper."""
        ids = self._sp_encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_many(self, texts: Sequence[str], *, bos: bool, eos: bool) -> list[list[int]]:
        """``[encode(t) for t in texts]``, encoded by sentencepiece's threads in one call."""
        for text in texts:
            self._check_text(text)
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in self.sp.encode(list(texts))]

    def encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (no BOS/EOS) and, per token, the ``[begin, end)`` byte span it covers in
        ``text.encode("utf-8")``. The dummy-prefix space covers no bytes; of the byte-fallback
        tokens of one character, the last covers the character and the others are empty spans at
        its start."""
        self._check_text(text)
        proto = self.sp.encode(text, out_type="proto")
        return [p.id for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool, eos: bool, side: PadSide = "right"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad: ``(ids, mask)`` LongTensors of shape (B, T); mask 1 on real tokens."""
        return pad_batch(self.encode_many(texts, bos=bos, eos=eos), side=side)

    def decode_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Decode each row of a padded batch, keeping only the positions where ``mask`` is 1."""
        if ids.shape != mask.shape or ids.dim() != 2:
            raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must be equal 2-D shapes")
        return [self.decode(row[keep.bool()]) for row, keep in zip(ids, mask)]

    def _sp_encode(self, text: str) -> list[int]:
        self._check_text(text)
        return self.sp.encode(text)

    @staticmethod
    def _check_text(text: str) -> None:
        # sp.encode also accepts lists (a batch) and fails obscurely on lone surrogates.
        if not isinstance(text, str):
            raise TypeError(f"expected a str to encode, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"text is not valid unicode (cannot be UTF-8 encoded): {error}") from None


def pad_batch(
    seqs: Sequence[Sequence[int] | torch.Tensor],
    *,
    side: PadSide = "right",
    pad_value: int = 0,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length sequences into ``(values, mask)``, LongTensors of shape (B, T).

    ``mask`` is 1 on real positions and 0 on padding; ``pad_value`` fills the padding and means
    nothing (Llama 2 has no pad id). Right padding for training; left padding for generation, so
    that every prompt ends at the last column. ``T`` is the longest sequence, or ``pad_to``.
    Also pads per-token masks (e.g. loss masks) consistently with their ids.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if len(seqs) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    longest = max(len(r) for r in rows)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({longest})")
    values = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        if n == 0:
            continue
        span = slice(0, n) if side == "right" else slice(width - n, width)
        values[b, span] = row
        mask[b, span] = 1
    return values, mask


# ------------------------------------------------------------------------------------------------
# Training


class VocabSizeError(ValueError):
    """The requested vocabulary size does not fit the corpus (too large or too small)."""

    def __init__(self, message: str, *, requested: int, max_size: int | None = None, min_size: int | None = None):
        super().__init__(message)
        self.requested = requested
        self.max_size = max_size
        self.min_size = min_size


@dataclass
class CorpusStats:
    sentences: int = 0  # lines given to the trainer
    skipped_too_long: int = 0  # lines longer than max_sentence_length bytes (sentencepiece would skip them)
    sampled_from: int = 0  # usable lines before sampling down to input_sentence_size
    bytes: int = 0  # UTF-8 bytes of the lines given to the trainer


def _select_sentences(lines: Iterable[str], max_bytes: int, limit: int, seed: int) -> tuple[list[str], CorpusStats]:
    """The lines the trainer sees: over-long lines dropped, then at most ``limit`` of them.

    sentencepiece samples a corpus larger than ``input_sentence_size`` itself, but its sample is not
    reproducible across processes (0.2.x, even after ``set_random_generator_seed``). So the sample
    is drawn here -- uniform reservoir sampling with ``random.Random(seed)``, kept in corpus order --
    and sentencepiece never sees more than ``limit`` lines.
    """
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    stats = CorpusStats()
    for line in lines:
        if len(line.encode("utf-8")) > max_bytes:
            stats.skipped_too_long += 1
            continue
        index = stats.sampled_from
        stats.sampled_from += 1
        if limit <= 0 or len(kept) < limit:
            kept.append((index, line))
        else:
            slot = rng.randrange(index + 1)
            if slot < limit:
                kept[slot] = (index, line)
    if limit > 0 and stats.sampled_from > limit:
        kept.sort()
    sentences = [line for _, line in kept]
    stats.sentences = len(sentences)
    stats.bytes = sum(len(line.encode("utf-8")) for line in sentences)
    return sentences, stats


def _lines_of_texts(texts: Iterable[str]) -> Iterator[str]:
    # One sentence per line, as sentencepiece reads a text file.
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}]: expected a string, got {type(text).__name__}")
        for line in text.split("\n"):
            if line:
                yield line


def _lines_of_files(paths: Sequence[Path]) -> Iterator[str]:
    for path in paths:
        # Binary lines split on b"\n" only (\r is kept, as sentencepiece keeps it), decoded one by
        # one so that an encoding error names its line.
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    line = raw.rstrip(b"\n").decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{path}, line {line_no}: not valid UTF-8 ({error.reason})") from None
                if line:
                    yield line


def dataset_column_texts(path: str | Path, column: str, *, split: str = "train") -> list[str]:
    """The strings of one column of a dataset: a local file (json/jsonl/parquet/csv/txt), a folder
    written by ``save_to_disk``, a folder of data files, or a hub id (only where there is a network)."""
    import datasets  # imported here: ~1 s, and only this path needs it

    path_str = str(path)
    local = Path(path_str)
    builders = {
        ".json": "json",
        ".jsonl": "json",
        ".parquet": "parquet",
        ".csv": "csv",
        ".txt": "text",
        ".arrow": "arrow",
    }
    builder = builders.get(local.suffix.lower()) if local.is_file() else None
    if local.is_file() and builder is None:
        raise ValueError(f"{path_str}: unknown dataset file type {local.suffix!r} (use one of {sorted(builders)})")
    saved = local.is_dir() and any((local / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))
    try:
        if builder is not None:
            data = datasets.load_dataset(builder, data_files=path_str, split=split)
        elif saved:
            data = datasets.load_from_disk(path_str)
        else:
            data = datasets.load_dataset(path_str, split=split)
    except Exception as error:  # datasets raises many types; name the input instead of a deep trace
        raise ValueError(f"{path_str}: cannot load dataset split {split!r}: {type(error).__name__}: {error}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{path_str}: no split {split!r} (splits: {sorted(data)})")
        data = data[split]
    if column not in data.column_names:
        raise ValueError(f"{path_str}: no column {column!r} (columns: {data.column_names})")
    texts = data[column]
    for row, value in enumerate(texts):
        if not isinstance(value, str):
            raise ValueError(f"{path_str}, row {row}, column {column!r}: expected a string, got {type(value).__name__}")
    return list(texts)


def _parse_vocab_error(message: str, requested: int, corpus: str) -> VocabSizeError | None:
    if too_high := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
        largest = int(too_high.group(2))
        return VocabSizeError(f"vocabulary size {requested} is too large for the corpus {corpus}: with Llama 2's "
                              f"settings it supports at most {largest} pieces. Use a vocabulary size <= {largest}, "
                              "or a larger corpus.", requested=requested, max_size=largest)
    if too_low := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message):
        smallest = int(too_low.group(2))
        return VocabSizeError(f"vocabulary size {requested} is too small for the corpus {corpus}: it needs at least "
                              f"{smallest} pieces (3 special + 256 byte pieces + the {smallest - 259} characters that "
                              "character_coverage keeps).", requested=requested, min_size=smallest)
    return None


def _describe(paths: Sequence[Path], corpus_name: str | None) -> str:
    if corpus_name:
        return corpus_name
    shown = ", ".join(str(p) for p in paths[:3])
    return f"[{shown}{', ...' if len(paths) > 3 else ''}]"


def train_tokenizer_with_stats(
    inputs: str | Path | Sequence[str | Path] | None,
    out_path: str | Path,
    vocab_size: int,
    *,
    texts: Iterable[str] | None,
    corpus_name: str | None,
    num_threads: int,
    seed: int,
    **overrides: object,
) -> tuple[Path, CorpusStats]:
    """``train_tokenizer`` that also returns what was read (``CorpusStats``: lines, bytes, skipped)."""
    if (inputs is None) == (texts is None):
        raise ValueError("give exactly one of `inputs` (text files) and `texts` (strings)")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    unknown = set(overrides) - set(LLAMA2_TRAINER_SPEC)
    if unknown:
        raise ValueError(f"unknown trainer settings {sorted(unknown)} (known: {sorted(LLAMA2_TRAINER_SPEC)})")
    settings = {**LLAMA2_TRAINER_SPEC, **overrides}
    max_bytes = int(settings["max_sentence_length"])  # type: ignore[arg-type]

    if texts is not None:
        lines: Iterator[str] = _lines_of_texts(texts)
        corpus = corpus_name or "<texts>"
    else:
        paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]  # type: ignore[union-attr]
        if not paths:
            raise ValueError("no input files given")
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer training input not found: {path}")
        lines = _lines_of_files(paths)
        corpus = _describe(paths, corpus_name)

    sentences, stats = _select_sentences(lines, max_bytes, int(settings["input_sentence_size"]), seed)  # type: ignore[arg-type]
    if not sentences:
        raise ValueError(
            f"the corpus {corpus} has no usable lines "
            f"({stats.skipped_too_long} longer than {max_bytes} bytes were skipped)"
        )
    model = BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=num_threads,
            minloglevel=2,
            **settings,
        )
    except RuntimeError as error:
        vocab_error = _parse_vocab_error(str(error), vocab_size, corpus)
        if vocab_error is not None:
            raise vocab_error from None
        raise RuntimeError(f"sentencepiece failed to train on {corpus}: {error}") from None
    if stats.skipped_too_long:
        log.warning("%s: skipped %d lines longer than %d bytes", corpus, stats.skipped_too_long, max_bytes)

    # Write to a temporary file, then rename: no half-written model is ever left at out_path.
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(model.getvalue())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path, stats


def train_tokenizer(
    inputs: str | Path | Sequence[str | Path] | None,
    out_path: str | Path,
    vocab_size: int,
    *,
    texts: Iterable[str] | None = None,
    corpus_name: str | None = None,
    num_threads: int = DEFAULT_NUM_THREADS,
    seed: int = 0,
    **overrides: object,
) -> Path:
    """Train a SentencePiece BPE model with Llama 2's settings and write it to ``out_path``.

    The corpus is either ``inputs`` (UTF-8 text files) or ``texts`` (strings, e.g. a dataset
    column from ``dataset_column_texts``), never both; every line is one sentence, as in
    sentencepiece. ``corpus_name`` names the corpus in errors. ``overrides`` replace entries of
    ``LLAMA2_TRAINER_SPEC`` (for experiments; the defaults are Llama 2's). ``seed`` draws the
    sample of a corpus longer than ``input_sentence_size`` lines (200M, as Meta's).

    Raises ``VocabSizeError`` when the corpus cannot support ``vocab_size`` (the message gives the
    largest, or smallest, feasible size); on any error nothing is written at ``out_path``.
    """
    path, _ = train_tokenizer_with_stats(
        inputs,
        out_path,
        vocab_size,
        texts=texts,
        corpus_name=corpus_name,
        num_threads=num_threads,
        seed=seed,
        **overrides,
    )
    return path
