"""Callbacks of the stages: checkpointing that always keeps the final step, fault injection, and
the oracle's helpfulness of greedy answers (SFT and later stages)."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from llama2_lit.evaluation import helpfulness_summary, oracle_answers
from llama2_lit.rollout import ConsolidatedRollout


class StageCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves at the final training step.

    Lightning saves every ``every_n_train_steps`` steps; when the run's length is not a multiple of
    that, the last steps would be lost, or saved only after the epoch is closed (``on_train_end``),
    and resuming such a checkpoint skips the rest of the epoch's data. Saving at the end of the
    final *batch* instead keeps the data-loader position exact. A run stopped on purpose
    (``trainer.should_stop``, e.g. on SIGTERM) is saved the same way.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._is_final_step(trainer) and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    @staticmethod
    def _is_final_step(trainer: L.Trainer) -> bool:
        if trainer.should_stop:
            return True
        if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        max_epochs = trainer.max_epochs
        return bool(last_batch) and max_epochs is not None and max_epochs > 0 and \
            trainer.current_epoch + 1 >= max_epochs


class InjectNonFinite(Callback):
    """Fault injection: make optimizer step ``at_step`` (0-based) diverge, to drill the NaN guard.

    ``target="lr"`` sets that step's learning rate to NaN: the loss of the step is still finite,
    the update poisons the weights, and the *next* step's loss is NaN (how real divergence looks).
    ``target="weights"`` writes a NaN into the token embeddings before the step, so its own loss
    is NaN. Either way training must stop with ``NonFiniteLossError`` and keep the last good
    checkpoint.
    """

    def __init__(self, at_step: int, target: Literal["lr", "weights"] = "lr") -> None:
        if target not in ("lr", "weights"):
            raise ValueError(f"target must be 'lr' or 'weights', got {target!r}")
        self.at_step = at_step
        self.target = target

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.target == "weights" and trainer.global_step == self.at_step:
            with torch.no_grad():
                weight = pl_module.model.tok_embeddings.weight
                local = weight.to_local() if hasattr(weight, "to_local") else weight
                local.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.target == "lr" and trainer.global_step == self.at_step:
            for group in optimizer.param_groups:
                group["lr"] = float("nan")


# ------------------------------------------------------------------------------------ oracle
class OracleHelpfulness(Callback):
    """Logs the oracle's helpfulness of greedy answers to held-out prompts at every validation.

    ``val/helpfulness`` is the mean over the prompts, ``val/helpfulness_<category>`` the mean per
    prompt category (task, borderline, harmful), ``val/violation`` the share of unsafe answers.
    The first ``num_prompts`` records of ``prompts_file`` are used, always the same ones.

    Args:
        prompts_file: held-out ``prompts`` or ``chat`` records with the oracle's ``meta``.
        kind: the record kind of ``prompts_file``.
        num_prompts: how many prompts to answer.
        max_new_tokens: the longest answer.
        batch_size: prompts decoded together.
        tokenizer_path: default: the stage's, else the data module's ``tokenizer_path``.
    """

    def __init__(self, prompts_file: str, kind: Literal["prompts", "chat"] = "prompts", num_prompts: int = 64,
                 max_new_tokens: int = 64, batch_size: int = 16, tokenizer_path: str | None = None) -> None:
        self.prompts_file = prompts_file
        self.kind = kind
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.tokenizer_path = tokenizer_path
        self._records: list[dict] | None = None
        self._tokenizer: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from llama2_lit.data.records import load_records
        from llama2_lit.tokenizer import Tokenizer

        if self._records is None:
            self._records = load_records(self.prompts_file, self.kind)[: self.num_prompts]
        path = self.tokenizer_path or getattr(pl_module, "tokenizer_path", None) or \
            getattr(trainer.datamodule, "tokenizer_path", None)
        if path is None:
            raise ValueError("OracleHelpfulness needs a tokenizer: set its tokenizer_path (or the stage's or data's)")
        self._tokenizer = Tokenizer(path)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # A sharded model answers from one consolidated copy of its weights, freed afterwards
        # (paper section 3.2.3), not from its shards (an all-gather of every layer per token).
        with ConsolidatedRollout().rollout(pl_module.model) as engine:
            results = oracle_answers(engine.model, self._tokenizer, self._records,
                                     max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        for name, value in helpfulness_summary(results).items():
            pl_module.log(f"val/{name}", value)
