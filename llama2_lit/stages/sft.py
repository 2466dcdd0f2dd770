"""Supervised fine-tuning (paper section 3.1): next-token loss on the answers only.

"We zero-out the loss on tokens from the user prompt, so as a result, we backpropagate only on
answer tokens." The chat format (``llama2_lit.chat.encode_dialog``) gives each dialog a loss mask,
1 exactly on the assistant tokens and their EOS; the data module turns mask 0 into label -100 and
packs dialogs into sequences (batch contract as for pretraining). So the loss is pretraining's
loss, restricted by the labels — which is why this module is short, and why it also serves
rejection-sampling fine-tuning (section 3.2.3), Ghost Attention (section 3.3, loss zero on all
earlier turns) and safety context distillation (section 4.2.4): all three are "SFT on chat records
with a loss mask", only the data differs.

Paper hyper-parameters (section 3.1): cosine schedule, initial learning rate 2e-5, weight decay
0.1, batch 64 sequences of 4096 tokens, 2 epochs. The defaults below are those; warmup and the
final ratio are not stated (we keep no warmup and pretraining's 10%).

The oracle's helpfulness of greedy answers to held-out prompts is measured by the
``llama2_lit.stages.callbacks.OracleHelpfulness`` callback (configs/*/sft.yaml).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llama2_lit.config import IGNORE_INDEX
from llama2_lit.stages.pretrain import PretrainModule


class SFTModule(PretrainModule):
    """Fine-tuning on chat records with a loss mask. See ``StageModule`` for the arguments."""

    stage = "sft"

    def __init__(self, *args: Any, lr: float = 2e-5, warmup_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, lr=lr, warmup_steps=warmup_steps, **kwargs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        # Share of positions that carry a target: how much of each packed sequence is answers.
        labels = batch["labels"]
        self.log("train/target_fraction", (labels != IGNORE_INDEX).float().mean())
        return loss
