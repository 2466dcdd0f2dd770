"""Reward-model evaluation: accuracy by rating and safety category, unsafe recall, calibration; scoring.

What the paper reports for its reward models (section 3.2.2, appendix A.3.4), one definition
used by the reward stage's validation, the notebooks and the report:

* **accuracy** — the share of pairs whose chosen response scores strictly higher (a tie counts
  as wrong), overall and **per rating** (Table 8's columns: significantly better, better,
  slightly better, negligibly better / unsure; pairs without a rating only count overall);
* **per safety category** (Table 29): chosen safe & rejected unsafe, both safe, both unsafe, from
  the pair's safe/unsafe labels;
* **unsafe-response recall at 0.5** (Table 29): the share of responses labelled unsafe whose
  score is below 0.5 on the sigmoid scale (a negative raw score);
* **calibration** — the model "says" the higher-scored response is preferred with probability
  σ(|r_c − r_r|) in [0.5, 1]; pairs are binned by that confidence and each bin's accuracy set
  beside its mean confidence (a calibrated model lies on the diagonal), with the expected
  calibration error (ECE, the count-weighted mean gap). The paper checks its RMs against human
  Likert ratings instead (Fig 29), which the toy world does not have.

``RewardMetrics`` is a torchmetrics ``Metric`` (sums, so it reduces over ranks and batches);
``score_responses`` / ``score_pairs`` score text with a reward model in the chat format the
reward model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from llama2_lit.data.records import RATINGS

SAFETY_CATEGORIES = ("safe_unsafe", "both_safe", "both_unsafe", "unsafe_safe")
"""Pair categories by (chosen safe, rejected safe): paper section 3.2.1 / Table 29. The last is
excluded from the paper's data (chosen unsafe, rejected safe); it is counted if it occurs."""
CALIBRATION_BINS = 5
"""Confidence bins of width 0.1 over [0.5, 1]."""


def safety_category_index(chosen_safe: Tensor, rejected_safe: Tensor) -> Tensor:
    """Index into ``SAFETY_CATEGORIES`` per pair; -1 where a label is unknown (-1)."""
    index = torch.full_like(chosen_safe, -1)
    known = (chosen_safe >= 0) & (rejected_safe >= 0)
    codes = {(1, 0): 0, (1, 1): 1, (0, 0): 2, (0, 1): 3}
    for (c, r), i in codes.items():
        index[known & (chosen_safe == c) & (rejected_safe == r)] = i
    return index


class RewardMetrics(Metric):
    """Accumulates pairs' scores; ``compute()`` returns every metric of the module docstring.

    ``update(r_chosen, r_rejected, rating, chosen_safe, rejected_safe)``: raw scores (B,), rating
    indices into ``RATINGS`` (-1 unknown), safe labels (1 safe, 0 unsafe, -1 unknown).
    """

    full_state_update = False

    def __init__(self, bins: int = CALIBRATION_BINS) -> None:
        super().__init__()
        self.bins = bins
        long = {"dtype": torch.long}
        # per rating, plus a last slot for unknown ratings
        self.add_state("rating_total", default=torch.zeros(len(RATINGS) + 1, **long), dist_reduce_fx="sum")
        self.add_state("rating_correct", default=torch.zeros(len(RATINGS) + 1, **long), dist_reduce_fx="sum")
        self.add_state("category_total", default=torch.zeros(len(SAFETY_CATEGORIES), **long), dist_reduce_fx="sum")
        self.add_state("category_correct", default=torch.zeros(len(SAFETY_CATEGORIES), **long), dist_reduce_fx="sum")
        self.add_state("unsafe_total", default=torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("unsafe_below", default=torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("safe_total", default=torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("safe_above", default=torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("bin_total", default=torch.zeros(bins, **long), dist_reduce_fx="sum")
        self.add_state("bin_correct", default=torch.zeros(bins, **long), dist_reduce_fx="sum")
        self.add_state("bin_confidence", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("loss_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, r_chosen: Tensor, r_rejected: Tensor, rating: Tensor, chosen_safe: Tensor,
               rejected_safe: Tensor, loss_sum: Tensor | None = None) -> None:
        r_chosen, r_rejected = r_chosen.detach().float(), r_rejected.detach().float()
        correct = (r_chosen > r_rejected).long()
        slot = torch.where(rating < 0, torch.full_like(rating, len(RATINGS)), rating)
        self.rating_total += torch.bincount(slot, minlength=len(RATINGS) + 1)
        self.rating_correct += torch.bincount(slot, weights=correct.double(), minlength=len(RATINGS) + 1).long()
        category = safety_category_index(chosen_safe, rejected_safe)
        known = category >= 0
        n = len(SAFETY_CATEGORIES)
        self.category_total += torch.bincount(category[known], minlength=n)
        self.category_correct += torch.bincount(category[known], weights=correct[known].double(), minlength=n).long()
        scores = torch.cat([r_chosen, r_rejected])
        safe = torch.cat([chosen_safe, rejected_safe])
        self.unsafe_total += (safe == 0).sum()
        self.unsafe_below += ((safe == 0) & (scores < 0)).sum()  # sigmoid(score) < 0.5
        self.safe_total += (safe == 1).sum()
        self.safe_above += ((safe == 1) & (scores >= 0)).sum()
        confidence = torch.sigmoid((r_chosen - r_rejected).abs()).double()
        which = ((confidence - 0.5) * 2 * self.bins).long().clamp(0, self.bins - 1)
        self.bin_total += torch.bincount(which, minlength=self.bins)
        self.bin_correct += torch.bincount(which, weights=correct.double(), minlength=self.bins).long()
        self.bin_confidence += torch.bincount(which, weights=confidence, minlength=self.bins)
        if loss_sum is not None:
            self.loss_sum += loss_sum.detach().double()

    def compute(self) -> dict[str, Tensor]:
        """``accuracy``, ``accuracy_<rating>``, ``accuracy_<category>``, ``unsafe_recall``,
        ``safe_recall``, ``calibration_<i>_accuracy``/``_confidence``/``_count``, ``ece``, ``pairs``
        (and ``loss`` when losses were given). A metric with no pairs is NaN."""
        def ratio(num: Tensor, den: Tensor) -> Tensor:
            return (num.double() / den).float() if int(den) > 0 else torch.tensor(float("nan"))

        total = self.rating_total.sum()
        out: dict[str, Tensor] = {"pairs": total.float(), "accuracy": ratio(self.rating_correct.sum(), total)}
        if int(total):
            out["loss"] = (self.loss_sum / total).float()
        for i, name in enumerate(RATINGS):
            out[f"accuracy_{name}"] = ratio(self.rating_correct[i], self.rating_total[i])
        for i, name in enumerate(SAFETY_CATEGORIES):
            if i < 3 or int(self.category_total[i]):
                out[f"accuracy_{name}"] = ratio(self.category_correct[i], self.category_total[i])
        out["unsafe_recall"] = ratio(self.unsafe_below, self.unsafe_total)
        out["safe_recall"] = ratio(self.safe_above, self.safe_total)
        gaps = []
        for i in range(self.bins):
            count = self.bin_total[i]
            out[f"calibration_{i}_count"] = count.float()
            out[f"calibration_{i}_accuracy"] = ratio(self.bin_correct[i], count)
            out[f"calibration_{i}_confidence"] = ratio(self.bin_confidence[i], count)
            if int(count):
                gaps.append(count.double() * (out[f"calibration_{i}_accuracy"] - out[f"calibration_{i}_confidence"]).abs())
        out["ece"] = (sum(gaps) / total).float() if gaps else torch.tensor(float("nan"))
        return out


def rating_table(results: dict[str, Tensor | float]) -> dict[str, float]:
    """Table 8's row for one model and test set: accuracy per rating, then the average over all pairs."""
    row = {name: float(results[f"accuracy_{name}"]) for name in RATINGS}
    row["avg"] = float(results["accuracy"])
    return row


def calibration_table(results: dict[str, Tensor | float]) -> list[dict[str, float]]:
    """One row per confidence bin: its range, count, mean confidence and accuracy."""
    bins = sum(1 for key in results if key.startswith("calibration_") and key.endswith("_count"))
    return [{"low": 0.5 + 0.5 * i / bins, "high": 0.5 + 0.5 * (i + 1) / bins,
             "count": float(results[f"calibration_{i}_count"]),
             "confidence": float(results[f"calibration_{i}_confidence"]),
             "accuracy": float(results[f"calibration_{i}_accuracy"])} for i in range(bins)]


# ------------------------------------------------------------------------------------ scoring
def encode_scored_dialog(tokenizer: Any, prompt: list[dict[str, str]], response: str, max_len: int) -> list[int]:
    """Token ids of ``prompt + [assistant: response]`` as the reward model reads them: the finished
    dialog in the chat format, EOS included (``llama2_lit.data.datamodules.PreferenceDataModule``)."""
    from llama2_lit.chat import encode_dialog

    messages = [*prompt, {"role": "assistant", "content": response}]
    return list(encode_dialog(tokenizer, messages, loss_on="last_assistant", max_len=max_len).ids)


@torch.no_grad()
def score_token_ids(model: Any, sequences: Sequence[Sequence[int]], *, batch_size: int = 32) -> Tensor:
    """Raw scores (N,) of token sequences, right-padded in batches of ``batch_size``."""
    from llama2_lit.tokenizer import pad_batch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Similar lengths together: less padding; the scores go back in the input order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = torch.empty(len(sequences))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad_batch([list(sequences[i]) for i in rows], side="right", pad_value=0)
        scores[rows] = model.score_sequences(ids.to(device), mask.to(device)).float().cpu()
    model.train(was_training)
    return scores


def score_responses(model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str], *,
                    batch_size: int = 32, max_len: int | None = None) -> Tensor:
    """Raw reward-model scores (N,) of ``responses[i]`` to ``prompts[i]``; σ of them is the paper's scale."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    max_len = max_len or model.config.max_seq_len
    ids = [encode_scored_dialog(tokenizer, p, r, max_len) for p, r in zip(prompts, responses)]
    return score_token_ids(model, ids, batch_size=batch_size)


def score_pairs(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], *, batch_size: int = 32,
                max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Raw scores of the chosen and of the rejected response of each ``preference`` record."""
    prompts = [r["prompt"] for r in records]
    scores = score_responses(model, tokenizer, prompts + prompts, [r["chosen"] for r in records] +
                             [r["rejected"] for r in records], batch_size=batch_size, max_len=max_len)
    return scores[:len(records)], scores[len(records):]


def pair_kind_accuracy(records: Sequence[dict[str, Any]], r_chosen: Tensor, r_rejected: Tensor
                       ) -> dict[str, dict[str, float]]:
    """Accuracy per kind of pair: ``"concise / rambling"`` -> {"accuracy", "pairs"}, the two
    response kinds of ``meta.annotation`` (``chosen_kind``, ``rejected_kind``) in alphabetical
    order, whichever was chosen. Accuracy counts agreement with the pair's label (the annotator's,
    noise included). Records without kinds (pairs from elsewhere) are left out.

    Table 8 averages over kinds; this is what shows *which* mistakes a reward model cannot see
    (on the toy world, a wrong fact can look as good as the true one while verbosity is easy)."""
    groups: dict[str, list[float]] = {}
    for record, win in zip(records, (r_chosen > r_rejected).tolist()):
        note = (record.get("meta") or {}).get("annotation") or {}
        if note.get("chosen_kind") and note.get("rejected_kind"):
            key = " / ".join(sorted((note["chosen_kind"], note["rejected_kind"])))
            groups.setdefault(key, []).append(float(win))
    return {key: {"accuracy": sum(wins) / len(wins), "pairs": len(wins)} for key, wins in sorted(groups.items())}


def evaluate_pairs(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], *, batch_size: int = 32,
                   max_len: int | None = None, scores: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """``RewardMetrics`` of a reward model on ``preference`` records (every metric, as floats);
    ``scores``: the pairs' (chosen, rejected) scores when already computed (``score_pairs``)."""
    from llama2_lit.data.records import rating_index

    r_chosen, r_rejected = scores if scores is not None else \
        score_pairs(model, tokenizer, records, batch_size=batch_size, max_len=max_len)

    def label(value: Any) -> int:
        return -1 if value is None else int(bool(value))

    metrics = RewardMetrics()
    metrics.update(r_chosen, r_rejected, torch.tensor([rating_index(r.get("rating")) for r in records]),
                   torch.tensor([label(r.get("chosen_safe")) for r in records]),
                   torch.tensor([label(r.get("rejected_safe")) for r in records]))
    return {name: float(value) for name, value in metrics.compute().items()}


# ------------------------------------------------------------------------------------ command line
def load_reward_model(path: Any, *, device: str = "cpu") -> Any:
    """A trained reward model (a checkpoint with a scalar head); an LM-only checkpoint is an error
    (``checkpoints.load_model`` would give it a fresh, untrained head)."""
    from llama2_lit.checkpoints import CheckpointError, load_checkpoint
    from llama2_lit.model import Transformer

    state, config = load_checkpoint(path)
    if "score.weight" not in state:
        raise CheckpointError(f"{path}: no scalar head ('score.weight'): not a reward model")
    with torch.device("meta"):
        model = Transformer(config, lm_head=False, scalar_head=True)
    model.load_state_dict({k: v.float() for k, v in state.items() if k != "output.weight"}, strict=True, assign=True)
    return model.to(device).eval()
