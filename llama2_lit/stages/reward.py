"""Reward models (paper section 3.2.2): the core with a scalar head, trained on preference pairs.

* **The model.** "We initialize our reward models from pretrained chat model checkpoints": the
  SFT checkpoint (``init_from``), with "the classification head for next-token prediction ...
  replaced with a regression head for outputting a scalar reward" — built with ``lm_head=False,
  scalar_head=True``; a fresh head starts from ``Transformer.reset_score_head``.
* **The score** of a dialog is the scalar head at its last real token (the EOS of the response),
  wherever the padding is (``Transformer.score_sequences``); the paper does not say which token
  is read. Reported scores are ``sigmoid(score)``, in [0, 1] (Table 29's threshold of 0.5 is
  "negative values before Sigmoid").
* **The loss** is Eq. (2), ``-log σ(r_c − r_r − m(r))``, with the margin ``none``, ``small`` or
  ``large`` of Table 27 (``llama2_lit.rlhf.ranking``); pairs with an unknown rating get margin 0.
  The safety reward model may add ``safety_aux_weight`` times the safety auxiliary loss (our
  reading of appendix A.3.4: BCE of σ(r) against each response's safe label).
* **The optimiser** (section 3.2.2, "Training Details"): the base model's AdamW, maximum learning
  rate 1e-5 (5e-6 for 70B), cosine decay to 10% of it, warmup 3% of the total steps with a
  minimum of 5, one epoch ("training longer can lead to over-fitting"; the configs set
  ``max_epochs: 1``).
* **Validation** logs ``val/loss`` and every ``llama2_lit.reward_metrics.RewardMetrics`` metric
  (accuracy overall, per rating as in Table 8 and per safety category as in Table 29, unsafe
  recall at 0.5, calibration), for all validation pairs and, with several validation files, for
  each file as ``val/<file stem>/<metric>`` (e.g. the static held-out pairs next to the held-out
  pairs annotated on the current policy's own samples).

Batch contract (``PreferenceDataModule``): ``chosen_input_ids``, ``chosen_attention_mask``,
``rejected_input_ids``, ``rejected_attention_mask`` (B, T); ``rating``, ``chosen_safe``,
``rejected_safe`` (B,); optional ``source`` (B,), the index of the validation file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama2_lit.reward_metrics import RewardMetrics
from llama2_lit.rlhf.ranking import MARGINS, ranking_loss, rating_margins, safety_auxiliary_loss
from llama2_lit.stages.base import BatchContract, StageModule

PREFERENCE_BATCH = BatchContract(
    required=("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask",
              "rating", "chosen_safe", "rejected_safe"),
    token_ids=("chosen_input_ids", "rejected_input_ids"),
    same_shape=(("chosen_attention_mask", "chosen_input_ids"), ("rejected_attention_mask", "rejected_input_ids")),
)
"""A batch of preference pairs: both sequences of every pair are checked and counted."""


def paper_warmup_steps(total_steps: int, *, fraction: float = 0.03, minimum: int = 5) -> int:
    """Reward-model warmup (section 3.2.2): 3% of the steps, at least 5 — and below the total, so
    that a short run (a test) still reaches its peak."""
    return min(max(minimum, math.ceil(fraction * total_steps)), max(0, total_steps - 1))


class RewardModule(StageModule):
    """A reward model trained with the margin ranking loss. See ``StageModule`` for the shared arguments.

    Args:
        margin: ``none``, ``small`` or ``large`` (paper Table 27).
        safety_aux_weight: weight of the safety auxiliary loss (0: off; the safety RM's option).
        warmup_fraction, min_warmup_steps: the warmup when ``warmup_steps`` is None (paper: 3%, 5).
        lr: maximum learning rate (paper: 1e-5; 5e-6 for 70B).
    """

    stage = "reward"
    lm_head = False
    scalar_head = True
    batch_contract = PREFERENCE_BATCH

    def __init__(self, *args: Any, lr: float = 1e-5, warmup_steps: int | None = None, warmup_fraction: float = 0.03,
                 min_warmup_steps: int = 5, margin: str = "none", safety_aux_weight: float = 0.0,
                 **kwargs: Any) -> None:
        if margin not in MARGINS:
            raise ValueError(f"unknown margin {margin!r}; choose one of {sorted(MARGINS)}")
        if safety_aux_weight < 0:
            raise ValueError(f"safety_aux_weight must be >= 0, got {safety_aux_weight}")
        super().__init__(*args, lr=lr, warmup_steps=warmup_steps, **kwargs)
        self.val_metrics = RewardMetrics()
        self.source_metrics = torch.nn.ModuleList()
        self.source_names: list[str] = []
        self._batch_checked = False

    def warmup_steps_for(self, total_steps: int) -> int:
        hp = self.hparams
        if hp.warmup_steps is not None:
            return hp.warmup_steps
        return paper_warmup_steps(total_steps, fraction=hp.warmup_fraction, minimum=hp.min_warmup_steps)

    def setup(self, stage: str) -> None:
        # One more set of metrics per validation file, when there are several.
        files = list(getattr(getattr(self.trainer, "datamodule", None), "val_files", None) or [])
        if len(files) > 1 and not self.source_names:
            self.source_names = [Path(f).name.removesuffix(".gz").removesuffix(".jsonl") for f in files]
            self.source_metrics = torch.nn.ModuleList(RewardMetrics() for _ in files)

    # ------------------------------------------------------------------------------ scores and loss
    def pair_scores(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Raw scores of the chosen and the rejected sequences, one forward pass over both."""
        if not self._batch_checked:
            self.check_batch(batch)
            self._batch_checked = True
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        return self.model.score_sequences(ids, mask).chunk(2)

    def losses(self, batch: dict[str, Tensor], r_chosen: Tensor, r_rejected: Tensor) -> dict[str, Tensor]:
        """``ranking`` (Eq. 2, mean over pairs), ``safety_aux`` (when weighted) and their weighted sum ``loss``."""
        margin = rating_margins(batch["rating"], self.hparams.margin)
        out = {"ranking": ranking_loss(r_chosen, r_rejected, margin)}
        out["loss"] = out["ranking"]
        if self.hparams.safety_aux_weight > 0:
            scores = torch.cat([r_chosen, r_rejected])
            out["safety_aux"] = safety_auxiliary_loss(scores, torch.cat([batch["chosen_safe"], batch["rejected_safe"]]))
            out["loss"] = out["loss"] + self.hparams.safety_aux_weight * out["safety_aux"]
        return out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        r_chosen, r_rejected = self.pair_scores(batch)
        losses = self.losses(batch, r_chosen, r_rejected)
        self.check_finite_loss(losses["loss"], batch_idx)
        self.log("train/loss", losses["loss"], prog_bar=True)
        if "safety_aux" in losses:
            self.log("train/ranking_loss", losses["ranking"])
            self.log("train/safety_aux_loss", losses["safety_aux"])
        self.log("train/accuracy", (r_chosen > r_rejected).float().mean())
        self.log("train/score_gap", (r_chosen - r_rejected).mean().detach())
        return losses["loss"]

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Tensor]) -> None:
        r_chosen, r_rejected = self.pair_scores(batch)
        # The same loss as training, summed so that the epoch's mean weighs every pair once.
        loss_sum = self.losses(batch, r_chosen, r_rejected)["loss"] * r_chosen.shape[0]
        fields = (r_chosen, r_rejected, batch["rating"], batch["chosen_safe"], batch["rejected_safe"])
        self.val_metrics.update(*fields, loss_sum=loss_sum)
        if self.source_names and "source" in batch:
            for index, metrics in enumerate(self.source_metrics):
                # Every rank updates every file's metrics (maybe with no rows): their sync is collective.
                rows = batch["source"] == index
                loss_sum = torch.zeros((), device=r_chosen.device)
                if bool(rows.any()):
                    loss_sum = self.losses({k: v[rows] for k, v in batch.items() if isinstance(v, Tensor)},
                                           r_chosen[rows], r_rejected[rows])["loss"] * int(rows.sum())
                metrics.update(*(f[rows] for f in fields), loss_sum=loss_sum)

    def _log_metrics(self, prefix: str) -> None:
        groups = [(prefix, self.val_metrics)] + [(f"{prefix}/{name}", metrics)
                                                 for name, metrics in zip(self.source_names, self.source_metrics)]
        for name, metrics in groups:
            for key, value in metrics.compute().items():
                if not torch.isnan(value):
                    self.log(f"{name}/{key}", value, sync_dist=False, prog_bar=key == "accuracy" and name == prefix)
            metrics.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
