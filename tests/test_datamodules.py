"""DataModules: every record kind into correctly masked tensors (token by token), determinism,
the pretraining cache, and exact resume under a real Lightning Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import sentencepiece as spm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from llama2_lit.config import ModelConfig
from llama2_lit.data.datamodules import (
    IGNORE_INDEX,
    PreferenceDataModule,
    PretrainDataModule,
    PromptsDataModule,
    SFTDataModule,
    build_pretrain_cache,
    dialog_labels,
    document_attention,
    document_positions,
    drop_exchanges,
    in_validation_split,
    mix_sources,
    best_fit_packing,
    read_text_documents,
)
from llama2_lit.data.loader import ResumableDataLoader
from llama2_lit.model import Transformer
from llama2_lit.tokenizer import Tokenizer, train_tokenizer

BOS, EOS = 1, 2

CORPUS = """Alice lives in Paris.
She likes tea.

Bob is 12 years old.


Carol adds 3 and 4: 7.
"""


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def sp_ids(tokenizer_path: Path, text: str) -> list[int]:
    """Token ids straight from sentencepiece: the independent reference for every expectation."""
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path)).encode(text)


def exchange_ids(tokenizer_path: Path, user: str, answer: str) -> tuple[list[int], int]:
    """Meta's ids of one finished exchange and the number of its prompt tokens (BOS included)."""
    ids = [BOS, *sp_ids(tokenizer_path, f"[INST] {user} [/INST] {answer} "), EOS]
    prompt = [BOS, *sp_ids(tokenizer_path, f"[INST] {user} [/INST]")]
    assert ids[: len(prompt)] == prompt  # Llama 2's tokenizer never merges across " [/INST] "
    return ids, len(prompt)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 300-piece tokenizer with Llama 2's settings, trained once per session on a tiny corpus."""
    folder = tmp_path_factory.mktemp("tokenizer")
    lines = [f"{name} has {n} apples and lives in {city}." for n in range(40)
             for name, city in (("Alice", "Paris"), ("Bob", "Rome"), ("Carol", "Oslo"))]
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n")
    return train_tokenizer(folder / "corpus.txt", folder / "small.model", 300)


def tiny_model(vocab_size: int) -> Transformer:
    config = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                         multiple_of=32, max_seq_len=256)
    return Transformer(config).eval()


# ============================================================================== pure functions
def test_dialog_labels_are_the_next_token_where_the_target_is_in_the_loss_mask():
    ids = [1, 10, 11, 12, 13, 2]
    mask = [0, 0, 0, 1, 1, 1]
    assert dialog_labels(ids, mask) == [-100, -100, 12, 13, 2, -100]


def test_document_attention_is_block_diagonal_and_causal():
    mask = document_attention(torch.tensor([0, 0, 1, 1, 1, 2]))
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_document_positions_restart_at_each_start():
    is_start = torch.tensor([[False, False, True, False, False, True], [True, False, False, False, True, False]])
    assert document_positions(is_start).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]


def test_best_fit_packing_fills_the_fullest_bin_that_fits_and_never_splits():
    # 6 opens A (room 2), 5 opens B (room 3); 2 fits both and goes to the fuller A; 3 fills B;
    # 4 opens C; 1 joins C. (Next fit would have put 2 into B and left A two tokens short.)
    assert best_fit_packing([6, 5, 2, 3, 4, 1], 8) == [[0, 2], [1, 3], [4, 5]]
    assert best_fit_packing([3, 4, 2, 5, 1, 1], 7) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="item 1 has 9 tokens"):
        best_fit_packing([3, 9], 8)


def test_validation_split_depends_on_the_key_only_and_matches_the_fraction():
    keys = [f"document {i}" for i in range(4000)]
    held = [k for k in keys if in_validation_split(k, 0.1)]
    assert 340 < len(held) < 460
    assert held == [k for k in reversed(keys) if in_validation_split(k, 0.1)][::-1]
    assert not any(in_validation_split(k, 0.0) for k in keys)


def test_mixture_repeats_and_subsamples_each_source_by_its_weight():
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    mixed = mix_sources([a, b], [2.0, 0.5], seed=0)
    assert sorted(x for x in mixed if x[0] == "a") == sorted(a * 2)
    half = [x for x in mixed if x[0] == "b"]
    assert len(half) == 5 and len(set(half)) == 5
    assert mix_sources([a, b], [2.0, 0.5], seed=0) == mixed
    assert mix_sources([a, b], [2.0, 0.5], seed=1) != mixed


def test_drop_exchanges_keeps_the_system_message():
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert drop_exchanges(prompt, 1) == [prompt[0], prompt[3]]
    assert drop_exchanges(prompt[1:], 1) == [prompt[3]]


# ============================================================================== pretraining
def test_text_documents_are_blank_line_separated_blocks_or_text_records(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    assert read_text_documents(path) == [
        "Alice lives in Paris.\nShe likes tea.", "Bob is 12 years old.", "Carol adds 3 and 4: 7."]
    records = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "One.\n\nStill one."}, {"text": "Two."}])
    assert read_text_documents(records) == ["One.\n\nStill one.", "Two."]


def test_pretraining_stream_windows_and_labels_token_by_token(tmp_path, meta_tokenizer_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    dm = PretrainDataModule(str(meta_tokenizer_path), [str(path)], seq_len=8, batch_size=2,
                            cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    documents = ["Alice lives in Paris.\nShe likes tea.", "Bob is 12 years old.", "Carol adds 3 and 4: 7."]
    stream = [t for d in documents for t in [BOS, *sp_ids(meta_tokenizer_path, d), EOS]]
    assert dm.cache.train_tokens.tolist() == stream
    assert len(dm.train_dataset) == (len(stream) - 1) // 8
    for index in range(len(dm.train_dataset)):
        example = dm.train_dataset[index]
        window = stream[8 * index: 8 * index + 9]
        assert example["input_ids"].tolist() == window[:-1]
        # every next token is a target, except a BOS (the start of a document is given, not predicted)
        assert example["labels"].tolist() == [t if t != BOS else IGNORE_INDEX for t in window[1:]]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def document_masked_corpus(tmp_path, tokenizer_path, seq_len: int, batch_size: int) -> PretrainDataModule:
    """``CORPUS`` as a set-up pretraining DataModule with document masks."""
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    dm = PretrainDataModule(str(tokenizer_path), [str(path)], seq_len=seq_len, batch_size=batch_size,
                            document_mask=True, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    return dm


def test_pretraining_document_mask_blocks_documents_and_resets_positions(tmp_path, meta_tokenizer_path):
    dm = document_masked_corpus(tmp_path, meta_tokenizer_path, seq_len=16, batch_size=2)
    batch = dm.collate_fn([dm.train_dataset[0], dm.train_dataset[1]])
    stream = dm.cache.train_tokens.tolist()
    for row in range(2):
        window = stream[16 * row: 16 * row + 16]
        # document index of each position: a new document starts at each BOS
        doc = np.cumsum([t == BOS for t in window]).tolist()
        start = [max([s for s in range(t + 1) if window[s] == BOS] or [0]) for t in range(16)]
        for q in range(16):
            assert batch["position_ids"][row, q] == q - start[q]
            for k in range(16):
                assert batch["attention_mask"][row, q, k] == (k <= q and doc[k] == doc[q])
    assert batch["attention_mask"].shape == (2, 16, 16) and batch["attention_mask"].dtype == torch.bool


def test_document_mask_makes_a_window_compute_each_document_alone(tmp_path, meta_tokenizer_path):
    dm = document_masked_corpus(tmp_path, meta_tokenizer_path, seq_len=32, batch_size=1)
    batch = dm.collate_fn([dm.train_dataset[0]])
    model = tiny_model(32000)
    with torch.no_grad():
        packed = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        ids = batch["input_ids"][0]
        starts = [i for i in range(32) if ids[i] == BOS] + [32]
        assert starts[0] == 0 and len(starts) > 2  # several documents in the window
        for begin, end in zip(starts, starts[1:]):
            alone = model(ids[begin:end][None])
            torch.testing.assert_close(packed[0, begin:end], alone[0], rtol=1e-5, atol=1e-5)


def test_pretraining_validation_from_files_or_by_document_hash(tmp_path, meta_tokenizer_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("\n\n".join(f"Document number {i} is here." for i in range(200)))
    val.write_text("Held out text one.\n\nHeld out text two.")
    dm = PretrainDataModule(str(meta_tokenizer_path), [str(train)], [str(val)], seq_len=4, batch_size=2,
                            cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    expected = [t for d in ("Held out text one.", "Held out text two.")
                for t in [BOS, *sp_ids(meta_tokenizer_path, d), EOS]]
    assert dm.cache.val_tokens.tolist() == expected
    assert dm.cache.info["train_documents"] == 200
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["input_ids"][0].tolist() == expected[:4]  # in order, not shuffled

    by_hash = PretrainDataModule(str(meta_tokenizer_path), [str(train)], seq_len=4, batch_size=2, val_fraction=0.2,
                                 cache_dir=str(tmp_path / "cache"))
    by_hash.setup("fit")
    documents = [f"Document number {i} is here." for i in range(200)]
    held = [d for d in documents if in_validation_split(d, 0.2)]
    assert 20 < len(held) < 60
    assert by_hash.cache.info["val_documents"] == len(held)
    assert by_hash.cache.val_tokens.tolist() == [t for d in held for t in [BOS, *sp_ids(meta_tokenizer_path, d), EOS]]
    assert by_hash.cache.info["train_documents"] == 200 - len(held)


def test_pretraining_cache_is_reused_and_invalidated_by_tokenizer_data_and_settings(
        tmp_path, meta_tokenizer_path, small_tokenizer, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    cache = tmp_path / "cache"
    first = build_pretrain_cache(str(meta_tokenizer_path), [str(path)], cache_dir=cache)
    assert first.built
    assert sorted(p.name for p in cache.iterdir()) == [first.directory.name]  # no staging folder left behind

    # A second setup reads the cache: tokenizing anything now would fail the test.
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the corpus was tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr(Tokenizer, "encode", no_tokenizing)
        dm = PretrainDataModule(str(meta_tokenizer_path), [str(path)], seq_len=8, batch_size=2, cache_dir=str(cache))
        dm.prepare_data()
        dm.setup("fit")
        assert not dm.cache.built and dm.cache.directory == first.directory
        assert dm.cache.train_tokens.tolist() == first.train_tokens.tolist()

    other_tokenizer = build_pretrain_cache(str(small_tokenizer), [str(path)], cache_dir=cache)
    assert other_tokenizer.built and other_tokenizer.directory != first.directory
    assert other_tokenizer.train_tokens.tolist() == [
        t for d in read_text_documents(path) for t in [BOS, *sp_ids(small_tokenizer, d), EOS]]

    other_setting = build_pretrain_cache(str(meta_tokenizer_path), [str(path)], cache_dir=cache, val_fraction=0.5)
    assert other_setting.built and other_setting.directory != first.directory

    path.write_text(CORPUS + "\nDave is new.\n")
    changed_data = build_pretrain_cache(str(meta_tokenizer_path), [str(path)], cache_dir=cache)
    assert changed_data.built and changed_data.info["train_documents"] == 4
    assert len(list(cache.iterdir())) == 4


def test_pretraining_too_little_validation_text_is_a_clear_error(tmp_path, meta_tokenizer_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(CORPUS)
    val.write_text("Tiny.")
    dm = PretrainDataModule(str(meta_tokenizer_path), [str(train)], [str(val)], seq_len=64, batch_size=2,
                            cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="validation text has 5 tokens, fewer than one sequence"):
        dm.setup("fit")


# ============================================================================== determinism and resume
class BatchRecorder(L.LightningModule):
    """Records the batches it trains on (and the epoch of each)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[list[int]]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["input_ids"].tolist()))
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_and_record(datamodule: L.LightningDataModule, root: Path, max_steps: int, *, ckpt_path: str | None = None,
                   checkpoint: ModelCheckpoint | None = None, **trainer_kwargs) -> list:
    model = BatchRecorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=checkpoint is not None,
                        callbacks=[checkpoint] if checkpoint else [], num_sanity_val_steps=0, default_root_dir=root,
                        **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model.seen


@pytest.fixture
def corpus_files(tmp_path) -> tuple[str, str]:
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("\n\n".join(f"Person {i} lives in city {i % 7} and is {i % 50} years old." for i in range(7)))
    val.write_text("A held-out sentence about person 99, who lives in city 3.")
    return str(train), str(val)


def test_same_seed_same_batches_and_another_seed_another_order(tmp_path, meta_tokenizer_path, corpus_files):
    def epochs(seed: int) -> list:
        dm = PretrainDataModule(str(meta_tokenizer_path), [corpus_files[0]], seq_len=8, batch_size=4, seed=seed,
                                cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [[batch["input_ids"].tolist() for batch in loader] for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again
    assert first != other
    assert first[0] != first[1]  # a new order each epoch
    windows = lambda epoch: sorted(row for batch in epoch for row in batch)  # noqa: E731
    assert windows(first[0]) == windows(first[1]) == windows(other[0])  # the same windows, reordered


def test_loader_state_resumes_mid_epoch_and_rejects_changed_data():
    data = list(range(10))
    loader = ResumableDataLoader(data, batch_size=3, seed=5, collate_fn=lambda xs: xs)
    full = [batch for _ in range(3) for batch in loader]
    loader = ResumableDataLoader(data, batch_size=3, seed=5, collate_fn=lambda xs: xs)
    seen = []
    for batch in loader:
        seen.append(batch)
        if len(seen) == 2:
            break
    iterator = iter(loader)
    seen.append(next(iterator))
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == 3
    fresh = ResumableDataLoader(data, batch_size=3, seed=5, collate_fn=lambda xs: xs)
    fresh.load_state_dict(state)
    rest = [batch for _ in range(3) for batch in fresh][: len(full) - 3]
    assert seen + rest == full
    with pytest.raises(ValueError, match="num_examples: checkpoint 10, now 11"):
        ResumableDataLoader(list(range(11)), batch_size=3, seed=5).load_state_dict(state)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_lightning_run_sees_exactly_the_uninterrupted_batches(tmp_path, meta_tokenizer_path, corpus_files,
                                                                      num_workers):
    def datamodule() -> PretrainDataModule:
        return PretrainDataModule(str(meta_tokenizer_path), [corpus_files[0]], [corpus_files[1]], seq_len=8,
                                  batch_size=4, seed=3, num_workers=num_workers, cache_dir=str(tmp_path / "cache"))

    probe = datamodule()
    probe.setup("fit")
    per_epoch = len(probe.train_dataloader())
    assert per_epoch == 4  # the last batch of an epoch is short
    total = 11  # almost three epochs
    uninterrupted = fit_and_record(datamodule(), tmp_path / "full", total)
    assert len(uninterrupted) == total and [epoch for epoch, _ in uninterrupted] == [0] * 4 + [1] * 4 + [2] * 3

    checkpoints = tmp_path / "checkpoints"
    every_step = ModelCheckpoint(dirpath=checkpoints, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    interrupted = fit_and_record(datamodule(), tmp_path / "part", 7, checkpoint=every_step)
    assert interrupted == uninterrupted[:7]
    # mid-epoch 0, at the epoch boundary (after the last batch of epoch 0), and mid-epoch 1
    for step in (2, per_epoch, 6):
        resumed = fit_and_record(datamodule(), tmp_path / f"resume{step}", total,
                                 ckpt_path=str(checkpoints / f"step={step}.ckpt"))
        assert uninterrupted[:step] + resumed == uninterrupted, f"resumed from step {step}"


# ============================================================================== SFT
SYSTEM = "Answer in one word."
DIALOG = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "Five."},
    {"role": "user", "content": "And 2+4?"},
    {"role": "assistant", "content": "Six, of course."},
]
SHORT_DIALOG = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]


def expected_dialog(tokenizer_path: Path, messages: list[dict], loss_on: str = "all_assistant"):
    """Meta's ids of a training dialog and its shifted labels, built exchange by exchange."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system else messages
    ids, answer_positions = [], []
    for i in range(0, len(turns), 2):
        user = turns[i]["content"]
        if i == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        exchange, prompt_len = exchange_ids(tokenizer_path, user, turns[i + 1]["content"])
        last = i == len(turns) - 2
        if loss_on == "all_assistant" or last:
            answer_positions += range(len(ids) + prompt_len, len(ids) + len(exchange))
        ids += exchange
    labels = [ids[t + 1] if t + 1 in answer_positions else IGNORE_INDEX for t in range(len(ids) - 1)]
    return ids, labels + [IGNORE_INDEX]


@pytest.mark.parametrize("loss_on", ["all_assistant", "last_assistant"])
def test_sft_labels_are_the_next_token_exactly_on_the_answers(tmp_path, meta_tokenizer_path, loss_on):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": DIALOG}, {"messages": SHORT_DIALOG}])
    dm = SFTDataModule(str(meta_tokenizer_path), [path], val_files=[path], batch_size=2, loss_on=loss_on)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))  # validation keeps file order
    assert set(batch) == {"input_ids", "labels"}
    ids, labels = expected_dialog(meta_tokenizer_path, DIALOG, loss_on)
    short_ids, short_labels = expected_dialog(meta_tokenizer_path, SHORT_DIALOG, loss_on)
    width = len(ids)
    assert batch["input_ids"].tolist() == [ids, short_ids + [0] * (width - len(short_ids))]
    assert batch["labels"].tolist() == [labels, short_labels + [IGNORE_INDEX] * (width - len(short_ids))]
    # By hand: the last answer's targets are its own tokens, then the lone "▁" (29871) and EOS.
    answer = sp_ids(meta_tokenizer_path, "Six, of course. ")
    targets = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert answer[-1] == 29871 and targets[-len(answer) - 1:] == answer + [EOS]
    first_answer = sp_ids(meta_tokenizer_path, "Five. ")
    if loss_on == "all_assistant":
        assert targets == first_answer + [EOS] + answer + [EOS]
    else:
        assert targets == answer + [EOS]


def test_sft_packing_blocks_dialogs_resets_positions_and_computes_each_dialog_alone(tmp_path, meta_tokenizer_path):
    dialogs = [DIALOG, SHORT_DIALOG, [{"role": "user", "content": "Name a colour."},
                                      {"role": "assistant", "content": "Blue."}]]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": d} for d in dialogs])
    lengths = [len(expected_dialog(meta_tokenizer_path, d)[0]) for d in dialogs]
    max_len = lengths[0] + max(lengths[1:])  # the long dialog fits with one short one
    dm = SFTDataModule(str(meta_tokenizer_path), [path], max_seq_len=max_len, batch_size=4, packing=True, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    expected = {tuple(expected_dialog(meta_tokenizer_path, d)[0]): expected_dialog(meta_tokenizer_path, d)[1]
                for d in dialogs}
    rows, width = batch["input_ids"].shape
    assert rows == len(dm.train_dataset) < 3 and width <= max_len
    found, model = [], tiny_model(32000)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    for row in range(rows):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        starts = [t for t in range(width) if batch["position_ids"][row, t] == 0]
        bounds = starts + [width]
        for begin, end in zip(bounds, bounds[1:]):
            segment = tuple(ids[begin:end])
            if segment in expected:  # a whole dialog: its labels, positions 0.., and nothing else visible
                found.append(segment)
                assert labels[begin:end] == expected[segment]
                assert batch["position_ids"][row, begin:end].tolist() == list(range(end - begin))
                alone = model(torch.tensor([segment]))
                torch.testing.assert_close(logits[row, begin:end], alone[0], rtol=1e-5, atol=1e-5)
            else:  # the padding at the end of a row
                assert end == width and set(segment) == {0} and set(labels[begin:end]) == {IGNORE_INDEX}
        # block diagonal and causal over the segments found
        segment_of = torch.tensor([sum(t >= s for s in starts) for t in range(width)])
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        assert torch.equal(batch["attention_mask"][row], (segment_of[:, None] == segment_of[None, :]) & causal)
    assert sorted(found) == sorted(expected)  # every dialog exactly once, none split
    assert 0 < dm.packing_efficiency <= 1


def test_sft_mixture_weights_and_long_dialog_policy(tmp_path, meta_tokenizer_path, caplog):
    helpful = write_jsonl(tmp_path / "helpful.jsonl", [{"messages": SHORT_DIALOG}])
    safety = write_jsonl(tmp_path / "safety.jsonl", [{"messages": DIALOG}])
    dm = SFTDataModule(str(meta_tokenizer_path), [helpful, safety], train_weights=[3.0, 1.0], batch_size=2)
    dm.setup("fit")
    short_ids = expected_dialog(meta_tokenizer_path, SHORT_DIALOG)[0]
    assert sorted(len(e["input_ids"]) for e in dm.train_dataset.examples) == sorted(
        [len(short_ids)] * 3 + [len(expected_dialog(meta_tokenizer_path, DIALOG)[0])])

    # Too long: the first exchange is dropped, the system prompt moves to the kept one (chat.py's policy).
    last_exchange = [DIALOG[0], DIALOG[3], DIALOG[4]]
    fits = len(expected_dialog(meta_tokenizer_path, last_exchange)[0])
    dm = SFTDataModule(str(meta_tokenizer_path), [safety, helpful], max_seq_len=fits, batch_size=2)
    dm.setup("fit")
    assert dm.train_dataset[0]["input_ids"] == expected_dialog(meta_tokenizer_path, last_exchange)[0]
    # A dialog whose last exchange alone does not fit is skipped and counted, or is an error.
    dm = SFTDataModule(str(meta_tokenizer_path), [safety, helpful], max_seq_len=len(short_ids), batch_size=2)
    dm.setup("fit")
    assert dm.skipped_too_long == [f"{safety}, record 1"] and len(dm.train_dataset) == 1
    assert "skipped 1 records" in caplog.text
    strict = SFTDataModule(str(meta_tokenizer_path), [helpful, safety], max_seq_len=len(short_ids), batch_size=2,
                           skip_too_long=False)
    with pytest.raises(ValueError, match=r"safety.jsonl, record 1: .*more than max_len"):
        strict.setup("fit")


# ============================================================================== preference
def test_preference_pairs_are_finished_dialogs_right_padded_with_ratings(tmp_path, meta_tokenizer_path):
    records = [
        {"prompt": [{"role": "user", "content": "Is the sky blue?"}], "chosen": "Yes, on a clear day.",
         "rejected": "No.", "rating": "better", "chosen_safe": True, "rejected_safe": False},
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Capital of France?"}],
         "chosen": "Paris.", "rejected": "It is Paris, a city in France.", "rating": "negligibly_better"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    dm = PreferenceDataModule(str(meta_tokenizer_path), [path], val_files=[path], batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"chosen_input_ids", "chosen_attention_mask", "rejected_input_ids",
                          "rejected_attention_mask", "rating", "chosen_safe", "rejected_safe", "source"}
    assert batch["source"].tolist() == [0, 0]  # the index of each validation pair's file
    assert "source" not in dm.train_dataset[0]  # the same file as training data: no source there
    sky = lambda answer: exchange_ids(meta_tokenizer_path, "Is the sky blue?", answer)[0]  # noqa: E731
    paris = lambda answer: exchange_ids(  # noqa: E731
        meta_tokenizer_path, f"<<SYS>>\n{SYSTEM}\n<</SYS>>\n\nCapital of France?", answer)[0]
    chosen = [sky("Yes, on a clear day."), paris("Paris.")]
    rejected = [sky("No."), paris("It is Paris, a city in France.")]
    width = max(map(len, chosen + rejected))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (2, width)
    for row in range(2):
        for side, ids in (("chosen", chosen[row]), ("rejected", rejected[row])):
            assert ids[-1] == EOS
            assert batch[f"{side}_input_ids"][row].tolist() == ids + [0] * (width - len(ids))
            assert batch[f"{side}_attention_mask"][row].tolist() == [1] * len(ids) + [0] * (width - len(ids))
    assert batch["rating"].tolist() == [1, 3]  # RATINGS.index("better"), RATINGS.index("negligibly_better")
    assert batch["chosen_safe"].tolist() == [1, -1] and batch["rejected_safe"].tolist() == [0, -1]
    assert all(v.dtype == torch.long for v in batch.values())


def test_a_too_long_pair_loses_the_same_exchanges_on_both_sides(tmp_path, meta_tokenizer_path):
    prompt = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "Five."},
              {"role": "user", "content": "And 2+4?"}]
    record = {"prompt": prompt, "chosen": "Six.", "rejected": "Six, because two plus four is six, " * 3,
              "rating": "slightly_better"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [record])
    limit = len(exchange_ids(meta_tokenizer_path, "And 2+4?", record["rejected"].strip())[0])
    chosen_whole = len(expected_dialog(meta_tokenizer_path, [*prompt, {"role": "assistant", "content": "Six."}])[0])
    assert chosen_whole <= limit  # alone, chosen would keep both exchanges; rejected fits only without the first
    dm = PreferenceDataModule(str(meta_tokenizer_path), [path], max_seq_len=limit, batch_size=1)
    dm.setup("fit")
    pair = dm.train_dataset[0]
    assert pair["chosen"] == exchange_ids(meta_tokenizer_path, "And 2+4?", "Six.")[0]
    assert pair["rejected"] == exchange_ids(meta_tokenizer_path, "And 2+4?", record["rejected"].strip())[0]
    assert pair["rating"] == 2


# ============================================================================== prompts
def test_prompts_are_left_padded_with_masks_safety_tags_messages_and_meta(tmp_path, meta_tokenizer_path):
    records = [
        {"messages": [{"role": "user", "content": "Hi"}], "is_safety": False, "meta": {"task": "greet"}},
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How do I pick a lock?"}],
         "is_safety": True},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    dm = PromptsDataModule(str(meta_tokenizer_path), [path], val_files=[path], batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    hi = [BOS, *sp_ids(meta_tokenizer_path, "[INST] Hi [/INST]")]
    lock = [BOS, *sp_ids(meta_tokenizer_path, f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nHow do I pick a lock? [/INST]")]
    width = len(lock)
    assert batch["input_ids"].tolist() == [[0] * (width - len(hi)) + hi, lock]
    assert batch["attention_mask"].tolist() == [[0] * (width - len(hi)) + [1] * len(hi), [1] * width]
    assert batch["is_safety"].tolist() == [False, True] and batch["is_safety"].dtype == torch.bool
    assert batch["messages"] == [records[0]["messages"], records[1]["messages"]]
    assert batch["meta"][0]["task"] == "greet"
    train_batch = next(iter(dm.train_dataloader()))
    assert isinstance(train_batch["messages"], list) and len(train_batch["meta"]) == 2


def test_prompt_batches_are_whole_so_every_ppo_iteration_has_the_same_prompts_count(tmp_path, meta_tokenizer_path):
    path = write_jsonl(tmp_path / "prompts.jsonl",
                       [{"messages": [{"role": "user", "content": f"Question {i}?"}], "is_safety": False} for i in range(7)])
    dm = PromptsDataModule(str(meta_tokenizer_path), [path], val_files=[path], batch_size=3)
    dm.setup("fit")
    assert [len(b["messages"]) for b in dm.train_dataloader()] == [3, 3]  # the 7th prompt waits for the next epoch
    kept = PromptsDataModule(str(meta_tokenizer_path), [path], val_files=[path], batch_size=3, drop_last=False)
    kept.setup("fit")
    assert [len(b["messages"]) for b in kept.train_dataloader()] == [3, 3, 1]
    too_few = PromptsDataModule(str(meta_tokenizer_path), [path], val_files=[path], batch_size=8)
    too_few.setup("fit")
    with pytest.raises(ValueError, match="7 training records make no whole batch of 8"):
        too_few.train_dataloader()


# ============================================================================== the toy world
@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    from llama2_lit.data.world import generate_world

    return Path(generate_world(tmp_path_factory.mktemp("world"), seed=0, size="small"))


def test_every_toy_world_file_loads_through_its_datamodule(small_world, meta_tokenizer_path, tmp_path):
    tokenizer, world = str(meta_tokenizer_path), small_world
    pretrain = PretrainDataModule(tokenizer, [str(world / "corpus_train.txt")], [str(world / "corpus_val.txt")],
                                  seq_len=128, batch_size=4, cache_dir=str(tmp_path / "cache"))
    pretrain.setup("fit")
    manifest = json.loads((world / "manifest.json").read_text())["files"]
    assert pretrain.cache.info["train_documents"] == manifest["corpus_train.txt"]["records"]
    assert pretrain.cache.info["val_documents"] == manifest["corpus_val.txt"]["records"]

    sft = SFTDataModule(tokenizer, [str(world / "sft_train.jsonl"), str(world / "gatt_train.jsonl")],
                        val_files=[str(world / "sft_eval.jsonl")], max_seq_len=512, batch_size=8, packing=True)
    sft.setup("fit")
    assert sft.packing_efficiency > 0.9 and not sft.skipped_too_long
    batch = next(iter(sft.train_dataloader()))
    targets = batch["labels"] != IGNORE_INDEX
    # every target is the next input token of the same dialog
    assert torch.equal(batch["labels"][:, :-1][targets[:, :-1]], batch["input_ids"][:, 1:][targets[:, :-1]])
    # no target crosses into the next dialog of a pack, nor past the end of a row
    before_start = torch.zeros_like(targets)
    before_start[:, :-1] = batch["position_ids"][:, 1:] == 0
    before_start[:, -1] = True
    assert not targets[before_start].any()

    preference = PreferenceDataModule(
        tokenizer, [str(world / "preference_helpful_train.jsonl"), str(world / "preference_safety_train.jsonl")],
        train_weights=[1.0, 0.5], val_files=[str(world / "preference_helpful_eval.jsonl")], batch_size=8)
    preference.setup("fit")
    helpful = manifest["preference_helpful_train.jsonl"]["records"]
    safety = manifest["preference_safety_train.jsonl"]["records"]
    assert len(preference.train_dataset) == helpful + round(safety / 2)
    batch = next(iter(preference.train_dataloader()))
    for side in ("chosen", "rejected"):
        last = batch[f"{side}_attention_mask"].sum(-1) - 1
        assert (batch[f"{side}_input_ids"][torch.arange(8), last] == EOS).all()  # a finished dialog
    assert set(batch["rating"].tolist()) <= {0, 1, 2, 3}

    prompts = PromptsDataModule(tokenizer, [str(world / "rl_prompts_train.jsonl")],
                                val_files=[str(world / "rl_prompts_eval.jsonl")], batch_size=8)
    prompts.setup("fit")
    assert sum(e["is_safety"] for e in prompts.train_dataset.examples) == sum(
        json.loads(line)["is_safety"] for line in (world / "rl_prompts_train.jsonl").read_text().splitlines())
    batch = next(iter(prompts.train_dataloader()))
    assert (batch["attention_mask"][:, -1] == 1).all()  # left-padded: every prompt ends at the last column
    assert all(isinstance(m, dict) for m in batch["meta"]) and len(batch["messages"]) == 8


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_from_checkpoints_written_at_mid_epoch_validation_with_gradient_accumulation(
        tmp_path, meta_tokenizer_path, corpus_files):
    def datamodule() -> PretrainDataModule:
        return PretrainDataModule(str(meta_tokenizer_path), [corpus_files[0]], [corpus_files[1]], seq_len=8,
                                  batch_size=4, seed=3, cache_dir=str(tmp_path / "cache"))

    settings = dict(val_check_interval=2, accumulate_grad_batches=2)  # 4 batches an epoch: 2 steps
    uninterrupted = fit_and_record(datamodule(), tmp_path / "full", 5, **settings)
    assert len(uninterrupted) == 10
    at_validation = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="{step}", save_top_k=-1,
                                    every_n_epochs=1, save_on_train_epoch_end=False)
    fit_and_record(datamodule(), tmp_path / "part", 3, checkpoint=at_validation, **settings)
    for step, batches in ((1, 2), (2, 4), (3, 6)):  # mid-epoch 0, end of epoch 0, mid-epoch 1
        resumed = fit_and_record(datamodule(), tmp_path / f"resume{step}", 5,
                                 ckpt_path=str(tmp_path / "checkpoints" / f"step={step}.ckpt"), **settings)
        assert uninterrupted[:batches] + resumed == uninterrupted, f"resumed from step {step}"
