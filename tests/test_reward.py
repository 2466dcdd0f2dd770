"""The reward-model stage: last-token pooling under any padding, metrics on a hand-made batch, the
base's token counting on preference batches, the paper's warmup, and a tiny RM that learns."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from test_stages import TINY, VOCAB

from llama2_lit.config import ModelConfig
from llama2_lit.data.datamodules import PreferenceCollate
from llama2_lit.data.loader import ResumableDataLoader
from llama2_lit.model import Transformer
from llama2_lit.reward_metrics import RewardMetrics, calibration_table, pair_kind_accuracy, rating_table
from llama2_lit.stages import RewardModule
from llama2_lit.stages.callbacks import StageCheckpoint
from llama2_lit.stages.reward import paper_warmup_steps
from llama2_lit.tokenizer import pad_batch


def test_score_is_read_at_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("nano", **TINY), lm_head=False, scalar_head=True)
    rows = [torch.randint(3, VOCAB, (n,)).tolist() for n in (5, 9, 12, 3)]
    right, right_mask = pad_batch(rows, side="right", pad_value=0)
    left, left_mask = pad_batch(rows, side="left", pad_value=0)
    alone = torch.stack([model.score_sequences(torch.tensor([row]))[0] for row in rows])
    torch.testing.assert_close(model.score_sequences(right, right_mask), alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.score_sequences(left, left_mask), alone, atol=1e-5, rtol=0)
    # Padding is never read: other pad ids change nothing.
    torch.testing.assert_close(model.score_sequences(right.masked_fill(right_mask == 0, 7), right_mask), alone,
                               atol=1e-5, rtol=0)


# One hand-made batch of 8 pairs (ratings by index, -1 unknown; safe labels 1/0/-1), worked out below.
HAND = {
    "rating": torch.tensor([0, 0, 1, 1, 2, 2, 3, -1]),
    "r_chosen": torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 0.2, 0.1, 3.0]),
    "r_rejected": torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0, -0.3, 0.4, 1.0]),
    "chosen_safe": torch.tensor([1, 1, 1, 0, 1, 0, 1, -1]),
    "rejected_safe": torch.tensor([0, 1, 0, 0, 1, 0, 1, -1]),
}



def test_accuracy_by_kind_of_pair_groups_either_order_and_skips_pairs_without_kinds():
    kinds = [("concise", "rambling"), ("rambling", "concise"), ("concise", "wrong"), ("wrong", "concise"),
             ("concise", "wrong"), ("partial", "wrong"), None, ("concise", "rambling")]
    records = [{"meta": {"annotation": {"chosen_kind": k[0], "rejected_kind": k[1]}}} if k else {"meta": {}}
               for k in kinds]
    # Correct (chosen strictly higher), as in the hand-made batch: 1 0 1 0 0(tie) 1 0 1.
    out = pair_kind_accuracy(records, HAND["r_chosen"], HAND["r_rejected"])
    assert out == {"concise / rambling": {"accuracy": 2 / 3, "pairs": 3},
                   "concise / wrong": {"accuracy": 1 / 3, "pairs": 3},
                   "partial / wrong": {"accuracy": 1.0, "pairs": 1}}


def test_reward_metrics_on_a_hand_made_batch():
    metrics = RewardMetrics()
    # Two updates (as two validation batches) must add up to one.
    for rows in (slice(0, 3), slice(3, 8)):
        metrics.update(HAND["r_chosen"][rows], HAND["r_rejected"][rows], HAND["rating"][rows],
                       HAND["chosen_safe"][rows], HAND["rejected_safe"][rows])
    out = {k: float(v) for k, v in metrics.compute().items()}
    # Correct (chosen strictly higher): 1 0 1 0 0(tie) 1 0 1.
    assert out["pairs"] == 8 and out["accuracy"] == 0.5
    assert rating_table(out) == {"significantly_better": 0.5, "better": 0.5, "slightly_better": 0.5,
                                 "negligibly_better": 0.0, "avg": 0.5}
    # Table 29's categories: safe/unsafe pairs 0, 2 (both right); both safe 1, 4, 6 (all wrong); both unsafe 3, 5.
    assert (out["accuracy_safe_unsafe"], out["accuracy_both_safe"], out["accuracy_both_unsafe"]) == (1.0, 0.0, 0.5)
    assert "accuracy_unsafe_safe" not in out  # the excluded category does not occur
    # Six unsafe responses, scores 0, 0, -1, 0, 0.2, -0.3: two below sigmoid 0.5 (0 is exactly 0.5: not below).
    assert out["unsafe_recall"] == pytest.approx(2 / 6)
    assert out["safe_recall"] == 1.0
    # Confidence sigmoid(|gap|) in 0.1-wide bins from 0.5: gaps 0 and 0.3 -> bin 0, 0.5 -> 1, 1 -> 2, 2 -> 3.
    table = calibration_table(out)
    assert [row["count"] for row in table] == [2, 2, 2, 2, 0]
    assert [row["accuracy"] for row in table[:4]] == [0.0, 1.0, 0.0, 1.0] and math.isnan(table[4]["accuracy"])
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert table[3]["confidence"] == pytest.approx(s(2.0))
    assert table[0]["confidence"] == pytest.approx((0.5 + s(0.3)) / 2)
    expected_ece = (2 * (0.5 + s(0.3)) / 2 + 2 * (1 - s(0.5)) + 2 * s(1.0) + 2 * (1 - s(2.0))) / 8
    assert out["ece"] == pytest.approx(expected_ece)


def test_paper_warmup_is_three_percent_of_the_steps_at_least_five():
    assert paper_warmup_steps(100) == 5 and paper_warmup_steps(1000) == 30 and paper_warmup_steps(1001) == 31
    assert paper_warmup_steps(4) == 3  # a short run still reaches its peak
    reward = RewardModule(preset="nano")
    assert reward.hparams.lr == 1e-5 and reward.hparams.margin == "none" and reward.hparams.min_lr_ratio == 0.1
    assert reward.warmup_steps_for(2000) == 60
    with pytest.raises(ValueError, match="unknown margin 'medium'"):
        RewardModule(preset="nano", margin="medium")


# ------------------------------------------------------------------------------------ training
class SyntheticPairs(torch.utils.data.Dataset):
    """Pairs whose chosen response ends in token 5 and rejected in token 6, of varied lengths."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.examples = []
        for i in range(n):
            prompt = torch.randint(10, VOCAB, (int(torch.randint(2, 6, (1,), generator=generator)),),
                                   generator=generator).tolist()
            body = torch.randint(10, VOCAB, (int(torch.randint(1, 5, (1,), generator=generator)),),
                                 generator=generator).tolist()
            other = torch.randint(10, VOCAB, (int(torch.randint(1, 5, (1,), generator=generator)),),
                                  generator=generator).tolist()
            self.examples.append({"chosen": prompt + body + [5], "rejected": prompt + other + [6],
                                  "rating": i % 4, "chosen_safe": 1, "rejected_safe": i % 2})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class PairsData(L.LightningDataModule):
    def train_dataloader(self):
        return ResumableDataLoader(SyntheticPairs(64, 0), batch_size=8, shuffle=True, seed=1,
                                   collate_fn=PreferenceCollate())

    def val_dataloader(self):
        return torch.utils.data.DataLoader(SyntheticPairs(32, 1), batch_size=16, collate_fn=PreferenceCollate())


class Batches(L.Callback):
    def __init__(self) -> None:
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.tokens.append(batch["chosen_input_ids"].numel() + batch["rejected_input_ids"].numel())


def test_a_tiny_reward_model_learns_and_counts_both_sequences_of_each_pair(tmp_path):
    L.seed_everything(0)
    reward = RewardModule(preset="nano", config_overrides=TINY, lr=3e-3, margin="small", safety_aux_weight=0.5,
                          peak_flops=1e11)
    seen = Batches()
    checkpoint = StageCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=16)
    run = L.Trainer(max_steps=16, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, callbacks=[checkpoint, seen],
                    val_check_interval=8, log_every_n_steps=4)
    before = RewardMetrics()
    reward.trainer = run
    reward.configure_model()
    with torch.no_grad():
        for batch in PairsData().val_dataloader():
            r_c, r_r = reward.pair_scores(batch)
            before.update(r_c, r_r, batch["rating"], batch["chosen_safe"], batch["rejected_safe"],
                          loss_sum=reward.losses(batch, r_c, r_r)["loss"] * len(r_c))
    run.fit(reward, PairsData())
    logged = {k: float(v) for k, v in run.callback_metrics.items()}
    assert reward.model.output is None and reward.model.score is not None
    before = {k: float(v) for k, v in before.compute().items()}
    assert logged["val/accuracy"] == 1.0 and logged["val/loss"] < 0.5 * before["loss"], (before, logged)
    assert logged["train/safety_aux_loss"] > 0 and logged["train/loss"] > logged["train/ranking_loss"]
    assert "val/accuracy_slightly_better" in logged and "val/unsafe_recall" in logged
    # Token counting follows the preference contract: chosen and rejected sequences of every pair.
    assert reward.tokens_seen == sum(seen.tokens)
    assert reward.batch_tokens(batch) == 2 * batch["chosen_input_ids"].numel()
    assert reward.batch_seq_len(batch) == batch["chosen_input_ids"].shape[1]
    assert logged["perf/tokens_per_s"] > 0 and logged["train/tokens"] == sum(seen.tokens[:16])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert "model.score.weight" in saved["state_dict"] and "model.output.weight" not in saved["state_dict"]
    with pytest.raises(KeyError, match="missing \\['rating'"):
        reward.check_batch({k: v for k, v in batch.items() if k != "rating"})
