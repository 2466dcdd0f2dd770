"""Tokenizer: Llama 2's training settings, Meta's tokenizer facts, round trip, padding, CLI."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2

from llama2_lit.cli import main as cli_main
from llama2_lit.tokenizer import (
    Tokenizer,
    VocabSizeError,
    _select_sentences,
    pad_batch,
    train_tokenizer,
)

WORDS = ["river", "mountain", "Paris", "café", "naïve", "über", "東京", "forest", "light", "stone", "garden", "tower"]


def corpus_lines(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) + ("" if rng.random() < 0.7 else str(rng.randint(0, 9999))) for _ in range(8)]
        lines.append(" ".join(words) + rng.choice([".", "!", "?", "  ok", "\t(x)"]))
    return lines


def model_proto(path: Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_path(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer([corpus_file], tmp_path_factory.mktemp("tok") / "small.model", 400)


@pytest.fixture(scope="module")
def trained(trained_path: Path) -> Tokenizer:
    return Tokenizer(trained_path)


# -- Meta's tokenizer (paper section 2.2) ---------------------------------------------------------


def test_meta_tokenizer_facts(meta_tokenizer_path: Path) -> None:
    tok = Tokenizer(meta_tokenizer_path)
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 0, 1, 2, -1)
    assert tok.pieces(tok.encode("2023", bos=False, eos=False)) == ["▁", "2", "0", "2", "3"]
    assert tok.pieces(tok.encode("🦙", bos=False, eos=False)) == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert tok.encode("\n", bos=False, eos=False) == [29871, 13]
    assert tok.encode(" ", bos=False, eos=False) == [259]  # "▁▁": dummy prefix + the space
    assert tok.encode("hi", bos=True, eos=True) == [1, 7251, 2]
    assert tok.id_to_piece(29871) == "▁"


def test_trained_settings_match_meta(trained_path: Path, meta_tokenizer_path: Path) -> None:
    ours, meta = model_proto(trained_path), model_proto(meta_tokenizer_path)
    for field in [
        "model_type", "character_coverage", "split_digits", "byte_fallback", "allow_whitespace_only_pieces",
        "split_by_unicode_script", "split_by_whitespace", "split_by_number", "treat_whitespace_as_suffix",
        "max_sentencepiece_length", "max_sentence_length", "input_sentence_size", "shuffle_input_sentence",
        "hard_vocab_limit", "unk_id", "bos_id", "eos_id", "pad_id", "unk_surface", "unk_piece", "bos_piece",
        "eos_piece", "vocabulary_output_piece_score",
    ]:  # fmt: skip
        assert getattr(ours.trainer_spec, field) == getattr(meta.trainer_spec, field), field
    for field in ["name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces", "precompiled_charsmap"]:
        assert getattr(ours.normalizer_spec, field) == getattr(meta.normalizer_spec, field), field
    assert ours.trainer_spec.vocab_size == 400
    assert list(ours.trainer_spec.input) == []  # no file name recorded: the file depends on the text only


def test_trained_vocabulary_layout(trained: Tokenizer) -> None:
    assert (trained.vocab_size, trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (400, 0, 1, 2, -1)
    assert trained.pieces([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    # byte fallback: ids 3..258 are the 256 bytes, in order, as in Meta's file
    assert trained.pieces(range(3, 259)) == [f"<0x{b:02X}>" for b in range(256)]
    assert "<pad>" not in trained.pieces(range(trained.vocab_size))


def test_digits_are_split(trained: Tokenizer) -> None:
    pieces = trained.pieces(range(259, trained.vocab_size))  # after specials and bytes
    assert any(p.isdigit() for p in pieces)
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]  # no multi-digit piece
    assert trained.pieces(trained.encode("9405", bos=False, eos=False)) == ["▁", "9", "4", "0", "5"]


def test_byte_fallback_for_unseen_characters(trained: Tokenizer) -> None:
    ids = trained.encode("🦙", bos=False, eos=False)
    assert trained.pieces(ids) == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert trained.unk_id not in ids
    assert trained.decode(ids) == "🦙"


def test_whitespace_is_kept(trained: Tokenizer) -> None:
    for text in ["  two leading", "trailing  ", "a  b\t\tc", "\n\nx", " "]:
        assert trained.decode(trained.encode(text, bos=False, eos=False)) == text


# -- round trip ---------------------------------------------------------------------------------
# Exact property: for any str that UTF-8 can encode, decode(encode(s)) == s with U+2581 ("▁",
# sentencepiece's own whitespace symbol) read as a space. Everything else survives: the identity
# normaliser changes nothing, byte fallback covers unknown characters, spaces are not collapsed,
# and decode removes exactly the dummy-prefix space that encode added.

unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_round_trip_meta(meta_tokenizer_path: Path, text: str) -> None:
    tok = _cached_tokenizer(meta_tokenizer_path)
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text.replace("\u2581", " ")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_round_trip_trained(trained: Tokenizer, text: str) -> None:
    assert trained.decode(trained.encode(text, bos=False, eos=False)) == text.replace("\u2581", " ")


_TOKENIZERS: dict[Path, Tokenizer] = {}


def _cached_tokenizer(path: Path) -> Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer(path)
    return _TOKENIZERS[path]


def test_round_trip_exception_is_the_whitespace_symbol(trained: Tokenizer) -> None:
    assert trained.decode(trained.encode("a\u2581b", bos=False, eos=False)) == "a b"


def test_encode_rejects_bad_input(trained: Tokenizer) -> None:
    with pytest.raises(TypeError, match="expected a str"):
        trained.encode(["a", "b"], bos=False, eos=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be UTF-8 encoded"):
        trained.encode("a\ud800", bos=False, eos=False)
    with pytest.raises(ValueError, match="out of range"):
        trained.decode([5, -1])


def test_loading_a_non_model_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.model"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        Tokenizer(path)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


# -- training: errors, determinism ---------------------------------------------------------------


def test_vocab_too_large_names_corpus_and_largest_size(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "big.model"
    with pytest.raises(VocabSizeError) as caught:
        train_tokenizer([corpus_file], out, 5000)
    error = caught.value
    assert error.requested == 5000 and error.max_size is not None and 259 < error.max_size < 5000
    assert str(corpus_file) in str(error) and f"<= {error.max_size}" in str(error)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial or temporary file
    # the size it names is feasible, and exactly the largest
    assert Tokenizer(train_tokenizer([corpus_file], out, error.max_size)).vocab_size == error.max_size


def test_failed_training_leaves_existing_file_untouched(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok.model"
    out.write_bytes(b"previous")
    with pytest.raises(VocabSizeError):
        train_tokenizer([corpus_file], out, 100_000)
    assert out.read_bytes() == b"previous"


def test_vocab_too_small(corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(VocabSizeError, match="too small") as caught:
        train_tokenizer([corpus_file], tmp_path / "t.model", 262)
    assert caught.value.min_size is not None and caught.value.min_size > 262
    assert (
        Tokenizer(train_tokenizer([corpus_file], tmp_path / "t.model", caught.value.min_size)).vocab_size
        == caught.value.min_size
    )


def test_training_is_deterministic(corpus_file: Path, trained_path: Path, tmp_path: Path) -> None:
    # same corpus + settings -> byte-identical file, whatever the file's name or location
    copy = tmp_path / "elsewhere.txt"
    copy.write_bytes(corpus_file.read_bytes())
    again = train_tokenizer([copy], tmp_path / "again.model", 400)
    assert again.read_bytes() == trained_path.read_bytes()
    # texts instead of files: same sentences -> same file
    from_texts = train_tokenizer(None, tmp_path / "texts.model", 400, texts=["\n".join(corpus_lines())])
    assert from_texts.read_bytes() == trained_path.read_bytes()


def test_sampled_corpus_is_reproducible_across_processes(corpus_file: Path, tmp_path: Path) -> None:
    # A corpus above input_sentence_size is sampled. sentencepiece's own sample changes from process
    # to process (even with set_random_generator_seed), so train_tokenizer draws it with its seed.
    script = (
        "import sys; from llama2_lit.tokenizer import train_tokenizer as t; "
        "t([sys.argv[1]], sys.argv[2], 340, input_sentence_size=200)"
    )
    for name in ("a.model", "b.model"):
        subprocess.run([sys.executable, "-c", script, str(corpus_file), str(tmp_path / name)], check=True, timeout=120)
    sampled = (tmp_path / "a.model").read_bytes()
    assert (tmp_path / "b.model").read_bytes() == sampled
    here = train_tokenizer([corpus_file], tmp_path / "c.model", 340, input_sentence_size=200).read_bytes()
    assert here == sampled
    other_seed = train_tokenizer([corpus_file], tmp_path / "d.model", 340, input_sentence_size=200, seed=1).read_bytes()
    assert other_seed != sampled
    assert model_proto(tmp_path / "c.model").trainer_spec.input_sentence_size == 200  # the setting is recorded as given


def test_sentence_selection() -> None:
    lines = [f"line {i}" for i in range(1000)] + ["x" * 5000]
    kept, stats = _select_sentences(lines, 4192, 200, seed=0)
    assert (stats.sentences, stats.sampled_from, stats.skipped_too_long) == (200, 1000, 1)
    assert kept == sorted(kept, key=lambda line: int(line.split()[1]))  # corpus order
    assert len(set(kept)) == 200 and kept != lines[:200]
    assert _select_sentences(lines, 4192, 200, seed=0)[0] == kept
    everything, stats = _select_sentences(lines, 4192, 0, seed=0)
    assert everything == lines[:1000] and stats.bytes == sum(len(line) for line in lines[:1000])


def test_threads_change_only_the_recorded_thread_count(trained_path: Path, corpus_file: Path, tmp_path: Path) -> None:
    one = model_proto(train_tokenizer([corpus_file], tmp_path / "one.model", 400, num_threads=1))
    reference = model_proto(trained_path)
    assert [(p.piece, p.score) for p in one.pieces] == [(p.piece, p.score) for p in reference.pieces]
    one.trainer_spec.num_threads = reference.trainer_spec.num_threads
    assert one.SerializeToString() == reference.SerializeToString()


def test_bad_training_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "t.model", 300)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nsecond line\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: not valid UTF-8"):
        train_tokenizer([bad], tmp_path / "t.model", 300)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no usable lines"):
        train_tokenizer([empty], tmp_path / "t.model", 300)
    with pytest.raises(TypeError, match=r"texts\[1\]: expected a string"):
        train_tokenizer(None, tmp_path / "t.model", 300, texts=["fine", 3])
    with pytest.raises(ValueError, match="unknown trainer settings"):
        train_tokenizer([bad], tmp_path / "t.model", 300, vocab_typo=1)
    assert not (tmp_path / "t.model").exists()


# -- batches ------------------------------------------------------------------------------------


def test_pad_batch_right_and_left() -> None:
    seqs = [[5, 6, 7], [8], []]
    ids, mask = pad_batch(seqs, side="right", pad_value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad_batch(seqs, side="left", pad_value=9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_batch([torch.tensor([2, 2]), [1]], side="left", pad_to=4)
    assert ids.tolist() == [[0, 0, 2, 2], [0, 0, 0, 1]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def test_pad_batch_keeps_eos_distinguishable_from_padding() -> None:
    # pad_value == EOS (2): the mask, not the value, says what is padding
    ids, mask = pad_batch([[1, 7, 2], [1, 2]], side="right", pad_value=2)
    assert ids.tolist() == [[1, 7, 2], [1, 2, 2]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_pad_batch_errors() -> None:
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([])
    with pytest.raises(ValueError, match="pad_to=1"):
        pad_batch([[1, 2]], pad_to=1)


def test_encode_many(trained: Tokenizer) -> None:
    texts = ["river 12", "", "  café über  ", "🦙"]
    assert trained.encode_many(texts, bos=True, eos=False) == [trained.encode(t, bos=True, eos=False) for t in texts]
    with pytest.raises(TypeError, match="expected a str"):
        trained.encode_many(["a", None], bos=False, eos=False)  # type: ignore[list-item]


def test_encode_and_decode_batch(trained: Tokenizer) -> None:
    texts = ["river 12", "a", "  café über  "]
    ids, mask = trained.encode_batch(texts, bos=True, eos=True, side="left")
    expected = [trained.encode(t, bos=True, eos=True) for t in texts]
    assert mask.sum(1).tolist() == [len(e) for e in expected]
    for row, keep, exp in zip(ids, mask, expected):
        assert row[keep.bool()].tolist() == exp
        assert keep.tolist() == sorted(keep.tolist())  # left padding: zeros first
    assert trained.decode_batch(ids, mask) == texts


# -- command line --------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_tokenizer_train_cli_files(corpus_file: Path, trained_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.model"
    code, stdout, _ = run_cli(
        ["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "400", "--out", str(out)], capsys
    )
    assert code == 0 and f"wrote {out}: 400 pieces from 600 lines" in stdout
    assert out.read_bytes() == trained_path.read_bytes()


def test_tokenizer_train_cli_dataset_column(trained_path: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    lines = corpus_lines()
    # documents of several lines each: every line is one sentence, as in a text file
    docs = ["\n".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]
    data.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "ds.model"
    argv = ["tokenizer", "train", "--dataset", str(data), "--column", "text", "--vocab-size", "400", "--out", str(out)]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0 and "from 600 lines" in stdout
    assert out.read_bytes() == trained_path.read_bytes()

    code, _, stderr = run_cli([*argv[:5], "body", *argv[6:]], capsys)
    assert code == 2 and "no column 'body'" in stderr and "'text'" in stderr
    code, _, stderr = run_cli([*argv[:-3], "5000", "--out", str(tmp_path / "x.model")], capsys)
    assert code == 2 and f"{data} (column 'text'" in stderr and "at most" in stderr
    assert not (tmp_path / "x.model").exists()


def test_tokenize_cli_plain_text(meta_tokenizer_path: Path, tmp_path: Path, capsys) -> None:
    code, stdout, _ = run_cli(["tokenize", "--tokenizer", str(meta_tokenizer_path), "2023"], capsys)
    record = json.loads(stdout)
    assert code == 0 and record["ids"] == [1, 29871, 29906, 29900, 29906, 29941]
    assert record["pieces"] == ["<s>", "▁", "2", "0", "2", "3"] and record["num_tokens"] == 6

    path = tmp_path / "in.txt"
    path.write_text("hi\n")
    code, stdout, _ = run_cli(
        ["tokenize", "--tokenizer", str(meta_tokenizer_path), "--no-bos", "--eos", str(path)], capsys
    )
    assert json.loads(stdout)["ids"] == [7251, 13, 2]  # the file's exact contents, newline included
    code, stdout, _ = run_cli(["tokenize", "--tokenizer", str(meta_tokenizer_path), "--text", str(path)], capsys)
    assert json.loads(stdout)["ids"] == Tokenizer(meta_tokenizer_path).encode(str(path), bos=True, eos=False)


def test_tokenize_cli_stdin_and_errors(trained_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("river"))
    code, stdout, _ = run_cli(["tokenize", "--tokenizer", str(trained_path), "-"], capsys)
    assert code == 0 and json.loads(stdout)["ids"] == Tokenizer(trained_path).encode("river", bos=True, eos=False)
    code, _, stderr = run_cli(["tokenize", "--tokenizer", "missing.model", "x"], capsys)
    assert code == 2 and "missing.model" in stderr
