"""Record formats: what every data file of the project holds, validated on load.

One JSON object per line (JSONL). Four kinds:

==============  =========================================================================================
kind            fields
==============  =========================================================================================
``text``        ``{"text": str}`` — a pretraining document. Plain ``.txt`` files are read as documents
                separated by blank lines.
``chat``        ``{"messages": [...]}`` — a dialog for SFT, ending with an assistant message.
``preference``  ``{"prompt": [...], "chosen": str, "rejected": str, "rating": str | null,
                "chosen_safe": bool | null, "rejected_safe": bool | null}`` — the prompt ends with a
                user message; ``rating`` is one of ``RATINGS`` (paper section 3.2.1) or null when
                unknown (the reward model then uses margin 0); the safety labels are optional.
``prompts``     ``{"messages": [...], "is_safety": bool}`` — a prompt for rejection sampling / PPO,
                ending with a user message; ``is_safety`` tags prompts that may elicit unsafe
                responses (PPO scores them with the safety RM, paper section 3.2.3).
==============  =========================================================================================

Any record may carry ``"meta"``: a dict for the oracle (task type, gold answer, risk category,
constraints; see ``llama2_lit.data.oracle``) and for reports. A message is
``{"role": "system"|"user"|"assistant", "content": str}``; role order is checked by
``llama2_lit.chat.validate_dialog`` (an optional first system message, then user and assistant
alternating), and contents must be non-empty.

Every problem is reported with the file, the line (or record index), the field and what was
expected — bad JSON, a missing field, a wrong role order, an empty file, an unknown rating,
chosen identical to rejected, an example longer than ``max_chars``. ``load_records`` raises
``RecordError`` listing them (or, with ``errors="skip"``, drops the bad records and logs how many
and why); ``llama2-lit data validate FILE --kind KIND`` prints them all and exits non-zero.

Sources: local ``.jsonl`` (also gzipped, ``.jsonl.gz`` as HH-RLHF ships) / ``.json`` files are read line by line with the ``json`` module (exact
records, exact line numbers; Arrow's schema unification would pad every ``meta`` dict with the
union of all keys and fail on values whose type varies between records); ``.parquet`` files and
Hugging Face hub ids go through ``datasets.load_dataset``. Two public formats are adapted on the
fly (``source_format="auto"`` recognises them per record):

- Anthropic HH-RLHF (``{"chosen": transcript, "rejected": transcript}`` with ``"\\n\\nHuman: "`` and
  ``"\\n\\nAssistant: "`` turns) -> ``preference``: the shared turns are the prompt, the final
  assistant turns are chosen and rejected; ``rating`` is null (unknown: margin 0) and the safety
  labels are null (unknown).
- Alpaca (``{"instruction", "input", "output"}``) -> ``chat``: one user turn (instruction, then the
  input after a blank line when present) and the output as the assistant's answer.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
"""Paper section 3.2.1's four degrees, index 0..3 (Table 27 gives their margins)."""
KINDS = ("text", "chat", "preference", "prompts")
SOURCE_FORMATS = ("auto", "native", "hh-rlhf", "alpaca")
MAX_REPORTED = 20  # problems quoted in a RecordError message

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


@dataclass(frozen=True)
class Problem:
    """One problem of one record: where (file, line or record index), which field, what is wrong."""

    source: str
    line: int | None
    field: str | None
    message: str
    index: int | None = None  # record number (1-based) where there are no lines (parquet, hub, JSON array)

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f", line {self.line}"
        elif self.index is not None:
            where += f", record {self.index}"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


class RecordError(ValueError):
    """Invalid records. ``source``, ``line`` and ``field`` locate the first problem; ``problems``
    lists them all."""

    def __init__(self, problems: list[Problem]) -> None:
        first = problems[0]
        self.source, self.line, self.field = first.source, first.line, first.field
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        head = str(first) if len(problems) == 1 else f"{len(problems)} problems in {first.source}:\n  {shown}{more}"
        super().__init__(head)


def rating_index(rating: str | None) -> int:
    """Index of a rating in ``RATINGS``; -1 for an unknown (null) rating."""
    return -1 if rating is None else RATINGS.index(rating)


# ------------------------------------------------------------------------------ validation
def _validate_dialog(messages: Any, *, for_generation: bool) -> None:
    # Role order is the chat format's rule, owned by llama2_lit.chat (one definition).
    from llama2_lit.chat import validate_dialog

    validate_dialog(messages, for_generation=for_generation)


def _message_problems(messages: Any, field: str, *, for_generation: bool) -> list[tuple[str, str]]:
    from llama2_lit.chat import ChatFormatError

    if messages is None:
        return [(field, "missing: expected a list of {'role', 'content'} messages")]
    try:
        _validate_dialog(messages, for_generation=for_generation)
    except ChatFormatError as error:
        return [(field, str(error))]
    problems = []
    for i, message in enumerate(messages):
        if message["role"] != "system" and not message["content"].strip():
            problems.append((f"{field}[{i}].content", f"empty {message['role']} message"))
    return problems


def _text_length(record: dict, kind: str) -> int:
    if kind == "text":
        return len(record["text"])
    if kind == "preference":
        prompt = sum(len(m["content"]) for m in record["prompt"])
        return prompt + max(len(record["chosen"]), len(record["rejected"]))
    return sum(len(m["content"]) for m in record["messages"])


def validate_record(record: Any, kind: str, *, max_chars: int | None = None) -> list[tuple[str | None, str]]:
    """Problems of one record as ``(field, message)`` pairs (empty when the record is valid).

    ``max_chars`` bounds the characters of an example: the text; all message contents; for a
    preference, the prompt plus the longer response."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    if not isinstance(record, dict):
        return [(None, f"expected a JSON object, got {type(record).__name__}")]
    problems: list[tuple[str | None, str]] = []

    def require_str(field: str) -> None:
        value = record.get(field)
        if field not in record:
            problems.append((field, "missing: expected a non-empty string"))
        elif not isinstance(value, str):
            problems.append((field, f"expected a string, got {type(value).__name__}"))
        elif not value.strip():
            problems.append((field, "empty: expected a non-empty string"))

    if kind == "text":
        require_str("text")
    elif kind in ("chat", "prompts"):
        problems += _message_problems(record.get("messages"), "messages", for_generation=kind == "prompts")
        if kind == "prompts":
            if "is_safety" not in record:
                problems.append(("is_safety", "missing: expected true or false"))
            elif not isinstance(record["is_safety"], bool):
                problems.append(("is_safety", f"expected true or false, got {record['is_safety']!r}"))
    else:  # preference
        problems += _message_problems(record.get("prompt"), "prompt", for_generation=True)
        require_str("chosen")
        require_str("rejected")
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() and chosen.strip() == rejected.strip():
            problems.append(("rejected", "identical to chosen: a preference pair needs two different responses"))
        if "rating" not in record:
            problems.append(("rating", f"missing: expected one of {RATINGS} or null (unknown)"))
        elif record["rating"] is not None and record["rating"] not in RATINGS:
            problems.append(("rating", f"unknown rating {record['rating']!r}: expected one of {RATINGS} or null (unknown)"))
        for field in ("chosen_safe", "rejected_safe"):
            if record.get(field) is not None and not isinstance(record[field], bool):
                problems.append((field, f"expected true, false or null, got {record[field]!r}"))
    if "meta" in record and record["meta"] is not None and not isinstance(record["meta"], dict):
        problems.append(("meta", f"expected a JSON object, got {type(record['meta']).__name__}"))
    if max_chars is not None and not problems:
        length = _text_length(record, kind)
        if length > max_chars:
            field = {"text": "text", "preference": "prompt+response"}.get(kind, "messages")
            problems.append((field, f"too long: {length} characters, more than max_chars={max_chars}"))
    return problems


# ------------------------------------------------------------------------------ adapters
def _hh_turns(transcript: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise ValueError(f"text before the first 'Human:' turn: {parts[0][:60]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def from_hh_rlhf(row: dict) -> dict:
    """An Anthropic HH-RLHF row -> a ``preference`` record (rating and safety labels unknown).

    Raises ``ValueError`` when the transcripts do not end with differing assistant turns after a
    shared prompt."""
    for field in ("chosen", "rejected"):
        if not isinstance(row.get(field), str):
            raise ValueError(f"HH-RLHF field {field!r}: expected a transcript string, got {type(row.get(field)).__name__}")
    chosen, rejected = _hh_turns(row["chosen"]), _hh_turns(row["rejected"])
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant":
            raise ValueError(f"HH-RLHF {name}: the transcript must end with an 'Assistant:' turn")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("HH-RLHF: chosen and rejected transcripts differ before their final assistant turn "
                         "(expected a shared prompt)")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"],
            "rating": None, "chosen_safe": None, "rejected_safe": None, "meta": {"source": "hh-rlhf"}}


def from_alpaca(row: dict) -> dict:
    """An Alpaca row (``instruction``, optional ``input``, ``output``) -> a ``chat`` record."""
    for field in ("instruction", "output"):
        if not isinstance(row.get(field), str):
            raise ValueError(f"Alpaca field {field!r}: expected a string, got {type(row.get(field)).__name__}")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError(f"Alpaca field 'input': expected a string, got {type(extra).__name__}")
    user = row["instruction"].strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"].strip()}],
            "meta": {"source": "alpaca"}}


def _detect(row: Any, kind: str) -> str:
    if not isinstance(row, dict):
        return "native"
    if kind == "preference" and "prompt" not in row and isinstance(row.get("chosen"), str) and "\n\nHuman:" in row["chosen"]:
        return "hh-rlhf"
    if kind == "chat" and "messages" not in row and "instruction" in row and "output" in row:
        return "alpaca"
    return "native"


def _adapt(row: Any, kind: str, source_format: str) -> Any:
    fmt = _detect(row, kind) if source_format == "auto" else source_format
    if fmt == "hh-rlhf":
        if kind != "preference":
            raise ValueError(f"the HH-RLHF adapter makes preference records, not {kind!r}")
        return from_hh_rlhf(row)
    if fmt == "alpaca":
        if kind != "chat":
            raise ValueError(f"the Alpaca adapter makes chat records, not {kind!r}")
        return from_alpaca(row)
    return row


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class _Row:
    value: Any
    line: int | None = None
    index: int | None = None
    error: str | None = None  # the row could not be parsed


def _read_jsonl(path: Path) -> Iterator[_Row]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        number = 0
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines hold no record
            try:
                yield _Row(json.loads(line), line=number)
            except json.JSONDecodeError as error:
                yield _Row(None, line=number, error=f"invalid JSON: {error.msg} (column {error.colno})")


def _read_json(path: Path) -> Iterator[_Row]:
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _read_jsonl(path)
        return
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        yield _Row(None, line=error.lineno, error=f"invalid JSON: {error.msg} (column {error.colno})")
        return
    for i, value in enumerate(values, start=1):
        yield _Row(value, index=i)


def _read_txt(path: Path) -> Iterator[_Row]:
    """Documents separated by blank lines; each is located by its first line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    block: list[str] = []
    start = 0
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield _Row({"text": "\n".join(block)}, line=start)
            block = []


def _read_datasets(source: str, split: str | None, data_files: str | None = None) -> Iterator[_Row]:
    import datasets

    try:
        if data_files is not None:
            dataset = datasets.load_dataset("parquet", data_files=data_files, split="train")
        else:
            dataset = datasets.load_dataset(source, split=split or "train")
    except Exception as error:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (" (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: hub datasets cannot be downloaded; download it on a "
                "machine with a network, or pass a local .jsonl/.json/.parquet file)") if offline and data_files is None else ""
        raise RecordError([Problem(source, None, None, f"cannot load with datasets: {type(error).__name__}: {error}{hint}")]) from None
    for i, row in enumerate(dataset, start=1):
        yield _Row(dict(row), index=i)


def _rows(source: str | Path, split: str | None) -> tuple[str, Iterator[_Row]]:
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl" or path.name.lower().endswith(".jsonl.gz"):
            return str(path), _read_jsonl(path)
        if suffix == ".json":
            return str(path), _read_json(path)
        if suffix == ".parquet":
            return str(path), _read_datasets(str(path), split, data_files=str(path))
        if suffix == ".txt":
            return str(path), _read_txt(path)
        raise RecordError([Problem(str(path), None, None, f"unsupported file type {suffix!r}: expected .jsonl, .jsonl.gz, .json, .parquet or .txt")])
    if path.exists():
        raise RecordError([Problem(str(path), None, None, "not a file")])
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(source)) and not str(source).endswith((".jsonl", ".gz", ".json", ".parquet", ".txt")):
        return str(source), _read_datasets(str(source), split)
    raise RecordError([Problem(str(source), None, None, "no such file (and not a Hugging Face hub id like 'owner/name')")])


def check_records(source: str | Path, kind: str, *, split: str | None = None, max_chars: int | None = None,
                  source_format: str = "auto") -> tuple[list[dict], list[Problem]]:
    """(valid records, problems) of a file or hub dataset: every problem, none raised."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"unknown source_format {source_format!r}; expected one of {SOURCE_FORMATS}")
    name, rows = _rows(source, split)
    if kind != "text" and name.endswith(".txt"):
        return [], [Problem(name, None, None, f"a .txt file holds text documents, not {kind!r} records")]
    records: list[dict] = []
    problems: list[Problem] = []
    count = 0
    for row in rows:
        count += 1
        if row.error is not None:
            problems.append(Problem(name, row.line, None, row.error, row.index))
            continue
        try:
            record = _adapt(row.value, kind, source_format)
        except ValueError as error:
            problems.append(Problem(name, row.line, None, str(error), row.index))
            continue
        found = validate_record(record, kind, max_chars=max_chars)
        problems += [Problem(name, row.line, field, message, row.index) for field, message in found]
        if not found:
            records.append(record)
    if count == 0:
        problems.append(Problem(name, None, None, "the file is empty (no records): expected at least one record"))
    return records, problems


def load_records(source: str | Path, kind: str, *, split: str | None = None, max_chars: int | None = None,
                 source_format: str = "auto", errors: Literal["raise", "skip"] = "raise") -> list[dict]:
    """The validated records of a local file (``.jsonl``, ``.json``, ``.parquet``; ``.txt`` for
    ``text``) or a Hugging Face hub dataset id (``split`` defaults to "train").

    Raises ``RecordError`` naming file, line and field of every problem; with ``errors="skip"``
    invalid records are dropped and logged (count and first problems) instead."""
    records, problems = check_records(source, kind, split=split, max_chars=max_chars, source_format=source_format)
    if problems:
        if errors == "raise" or not records:
            raise RecordError(problems)
        log.warning("%s: skipped %d invalid %s records (kept %d); first: %s", source, len(problems), kind,
                    len(records), "; ".join(str(p) for p in problems[:3]))
    return records


# ------------------------------------------------------------------------------ writing
def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Writes records as JSONL atomically (a temporary file in the same folder, then a rename):
    a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_records(records: list[dict], path: str | Path, kind: str, *, max_chars: int | None = None) -> Path:
    """Validates every record, then writes them atomically; nothing is written if one is invalid."""
    problems = [Problem(str(path), None, field, message, i)
                for i, record in enumerate(records, start=1)
                for field, message in validate_record(record, kind, max_chars=max_chars)]
    if not records:
        problems.append(Problem(str(path), None, None, "no records to write"))
    if problems:
        raise RecordError(problems)
    return write_jsonl(records, path)
