"""Pretraining (paper section 2.2): next-token prediction on packed sequences.

The batch contract (``llama2_lit.data.datamodules``): ``input_ids`` (B, T) and ``labels`` (B, T)
already shifted, so ``labels[b, t]`` is the target of the logits at position ``t``, with -100
where there is no target; optional ``attention_mask`` (a (B, T) padding mask or a (B, T, T)
document mask for packed sequences) and ``position_ids`` (positions restarting at each packed
document). The loss is the mean cross-entropy over the targets of the batch; validation reports
the mean over *all* target tokens of the validation set and its exponential, the perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from llama2_lit.config import IGNORE_INDEX
from llama2_lit.stages.base import StageModule

LM_BATCH_KEYS = ("input_ids", "labels")


def next_token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over positions with a target, and how many there are.

    logits: (B, T, V) fp32; labels: (B, T) long, pre-shifted, -100 = no target.
    """
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


def unigram_perplexity(train_targets: Tensor, val_targets: Tensor, vocab_size: int, *, smoothing: float = 1.0) -> float:
    """Perplexity on ``val_targets`` of the unigram model fitted to ``train_targets``.

    The baseline a language model must beat by using context: each token's probability is its
    training frequency (add-``smoothing`` counts, so unseen tokens keep a finite loss). Pass the
    same targets the model's validation perplexity is computed on (labels other than -100).
    """
    counts = torch.bincount(train_targets.flatten(), minlength=vocab_size).double() + smoothing
    log_probs = (counts / counts.sum()).log()
    return float((-log_probs[val_targets.flatten()].mean()).exp())


def dataset_targets(dataset) -> Tensor:
    """Every target token id of a dataset of language-model examples (labels other than -100)."""
    labels = torch.stack([dataset[i]["labels"] for i in range(len(dataset))])
    return labels[labels != IGNORE_INDEX]


class TokenMeanLoss(Metric):
    """Mean loss per target token over a whole evaluation (summed over batches and ranks).

    Averaging per-batch means would weight a batch with few targets like a full one.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, tokens: Tensor) -> None:
        self.loss_sum += loss_sum.detach().double()
        self.tokens += tokens.detach()

    def compute(self) -> Tensor:
        return (self.loss_sum / self.tokens.clamp(min=1)).float()


class PretrainModule(StageModule):
    """Next-token loss on packed text; validation loss and perplexity. See ``StageModule`` for args."""

    stage = "pretrain"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = TokenMeanLoss()
        self._batch_checked = False

    def lm_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(summed loss, number of targets) of one batch."""
        if not self._batch_checked:
            self.check_batch(batch, LM_BATCH_KEYS)
            self._batch_checked = True
        logits = self(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      position_ids=batch.get("position_ids"))
        return next_token_loss(logits, batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss_sum, tokens = self.lm_loss(batch)
        loss = loss_sum / tokens.clamp(min=1)
        self.check_finite_loss(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_loss.update(*self.lm_loss(batch))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", loss.exp())

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss)
        self.log("test/ppl", loss.exp())
