"""Callbacks of the stages: checkpointing that always keeps the final step and never leaves a
half-written checkpoint, fault injection (a non-finite step, an interrupted save), the oracle's
helpfulness of greedy answers (SFT and later stages), and a one-line-per-N-steps progress report."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal
from weakref import proxy

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from llama2_lit.evaluation import helpfulness_summary, oracle_answers
from llama2_lit.rollout import ConsolidatedRollout


class StageCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves at the final training step and never leaves a half checkpoint.

    Lightning saves every ``every_n_train_steps`` steps; when the run's length is not a multiple of
    that, the last steps would be lost, or saved only after the epoch is closed (``on_train_end``),
    and resuming such a checkpoint skips the rest of the epoch's data. Saving at the end of the
    final *batch* instead keeps the data-loader position exact. A run stopped on purpose
    (``trainer.should_stop``, e.g. on SIGTERM) is saved the same way.

    Every checkpoint on disk is whole, whatever moment a crash picks:

    * each save is written under a temporary name (``step-N.ckpt.partial``, a file or a sharded
      directory) and renamed to its own name (``step-N.ckpt``) only once every rank has finished
      writing (a barrier), with the bytes flushed to disk first;
    * ``last.ckpt`` is a symbolic link to the newest complete checkpoint, switched by an atomic
      ``os.replace`` of a new link, never rewritten in place (Lightning 2.6 overwrites a sharded
      ``last.ckpt`` in place, and its ``save_last="link"`` removes the old link before making the
      new one);
    * older checkpoints (``save_top_k``) are removed only after ``last`` points at the new one.

    So an interrupted save leaves a ``*.partial`` (removed when the run resumes) and ``last.ckpt``
    still naming the previous checkpoint. Readers need nothing special: opening ``last.ckpt``
    follows the link. ``save_last`` (``True`` or ``"link"``) always means this link; when no
    ``step-N`` checkpoint is saved at the step ``last`` must capture (``save_top_k: 0``, or a
    monitored metric that did not improve), one is written as ``last-step-N.ckpt`` and removed once
    ``last`` moves on. Local file systems only; elsewhere Lightning's own saving is used.

    This overrides ``ModelCheckpoint._save_checkpoint``, ``_save_last_checkpoint`` and
    ``_remove_checkpoint`` and reads its ``_last_global_step_saved`` and ``_last_checkpoint_saved``
    (private in Lightning 2.6; see the list next to the version pin in pyproject.toml).
    """

    PARTIAL_SUFFIX = ".partial"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._local = isinstance(self._fs, LocalFileSystem)
        if self._local and trainer.is_global_zero and stage == "fit" and Path(self.dirpath).is_dir():
            for leftover in Path(self.dirpath).glob(f"*{self.PARTIAL_SUFFIX}"):
                _remove(leftover)  # what an interrupted save left; never read

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

    # ------------------------------------------------------------------------------ whole saves
    @property
    def last_link(self) -> Path:
        """``<dirpath>/last.ckpt``, the link to the newest complete checkpoint."""
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not getattr(self, "_local", False):
            return super()._save_checkpoint(trainer, filepath)
        final = Path(filepath)
        partial = final.with_name(final.name + self.PARTIAL_SUFFIX)
        if self.save_last:
            self.last_model_path = str(self.last_link)  # part of the state about to be saved
        if trainer.is_global_zero:
            _remove(partial)
        trainer.strategy.barrier("StageCheckpoint.clear")
        trainer.save_checkpoint(partial, self.save_weights_only)
        trainer.strategy.barrier("StageCheckpoint.written")  # every rank has written its part
        if trainer.is_global_zero:
            _fsync(partial)
            if final.exists() or final.is_symlink():  # a step saved twice: the new one replaces it
                aside = final.with_name(final.name + ".old" + self.PARTIAL_SUFFIX)
                os.replace(final, aside)
                os.replace(partial, final)
                _remove(aside)
            else:
                os.replace(partial, final)
            _fsync_directory(final.parent)
        trainer.strategy.barrier("StageCheckpoint.renamed")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = str(final)
        if self.save_last:
            self._point_last_at(trainer, final)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not self.save_last or not getattr(self, "_local", False):
            return super()._save_last_checkpoint(trainer, monitor_candidates)
        saved = self._last_checkpoint_saved
        if saved and self._last_global_step_saved == trainer.global_step:
            self._point_last_at(trainer, Path(saved))  # this step is saved: ``last`` names it already
            return
        # Nothing saved at this step by ``save_top_k``: a checkpoint of its own, for ``last`` only.
        name = f"{self.CHECKPOINT_NAME_LAST}-step-{trainer.global_step}{self.FILE_EXTENSION}"
        self._save_checkpoint(trainer, str(Path(self.dirpath) / name))

    def _point_last_at(self, trainer: L.Trainer, target: Path) -> None:
        """Switch ``last.ckpt`` to ``target`` atomically; then drop the ``last``-only one it named."""
        link = self.last_link
        if trainer.is_global_zero:
            previous = Path(os.readlink(link)).name if link.is_symlink() else None
            if previous != target.name:
                temporary = link.with_name(link.name + self.PARTIAL_SUFFIX)
                _remove(temporary)
                os.symlink(target.name, temporary)  # relative: the run directory may move
                if link.is_dir() and not link.is_symlink():  # a real directory, from before links
                    aside = link.with_name(link.name + ".old" + self.PARTIAL_SUFFIX)
                    os.replace(link, aside)
                    os.replace(temporary, link)
                    _remove(aside)
                else:
                    os.replace(temporary, link)  # atomic: a reader sees the old link or the new
                _fsync_directory(link.parent)
                if previous is not None and previous.startswith(f"{self.CHECKPOINT_NAME_LAST}-"):
                    _remove(link.parent / previous)
        trainer.strategy.barrier("StageCheckpoint.linked")

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        link = self.last_link if self.dirpath else None
        if link is not None and link.is_symlink() and link.resolve() == Path(filepath).resolve():
            return  # never the checkpoint ``last`` names
        super()._remove_checkpoint(trainer, filepath)


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree, if there is one."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a directory tree, to disk (so a rename never outruns the bytes)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if path.is_dir():
        _fsync_directory(path)


def _fsync_directory(path: Path) -> None:
    """Flush a directory's entries (the renames in it); not possible on every OS, then skipped."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)



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


class CheckpointSaveInterrupted(RuntimeError):
    """Raised by ``InterruptCheckpointSave``: a save stopped midway, on purpose."""


class InterruptCheckpointSave(Callback):
    """Fault injection: crash in the middle of the checkpoint save at step ``at_step``, on ``rank``.

    For drills and tests of ``StageCheckpoint``. At that save, once ``rank`` has written its part
    (the whole file, or its shard files ``__<rank>_*.distcp`` of a sharded directory), the first
    half of each of those files is kept, as if the process died while writing them; then the
    process raises ``CheckpointSaveInterrupted`` (``how="raise"``) or dies at once with exit
    status 1 (``how="exit"``, like a killed process: no clean-up runs, the other ranks find it gone).
    It wraps ``trainer.strategy.save_checkpoint`` for the duration of the run.
    """

    def __init__(self, at_step: int, rank: int = 0, how: Literal["raise", "exit"] = "raise") -> None:
        if how not in ("raise", "exit"):
            raise ValueError(f"how must be 'raise' or 'exit', got {how!r}")
        self.at_step = at_step
        self.rank = rank
        self.how = how
        self._save: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        self._save = save = strategy.save_checkpoint

        def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            save(checkpoint, filepath, storage_options=storage_options)
            if trainer.global_step == self.at_step and trainer.global_rank == self.rank:
                self._interrupt(Path(filepath), trainer.global_rank)

        strategy.save_checkpoint = save_checkpoint

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._save is not None:
            trainer.strategy.save_checkpoint = self._save
            self._save = None

    def _interrupt(self, path: Path, rank: int) -> None:
        files = [path] if path.is_file() else sorted(path.glob(f"__{rank}_*.distcp"))
        for file in files:
            os.truncate(file, file.stat().st_size // 2)
        if self.how == "exit":
            os._exit(1)
        raise CheckpointSaveInterrupted(f"checkpoint save at step {self.at_step} interrupted on rank {rank} "
                                        f"(InterruptCheckpointSave): {path} is half-written")


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


# ------------------------------------------------------------------------------------ progress
class ProgressLine(Callback):
    """One line every ``every_n_steps`` optimizer steps: step / total, loss, tokens/s, elapsed — Lightning's
    progress bar for logs that are not a terminal (``llama2-lit demo`` under CI, a log file).

    Reads the values the stage logged (``train/loss``, ``perf/tokens_per_s``), so it shows what
    W&B and ``metrics.csv`` get.
    """

    def __init__(self, every_n_steps: int = 10, prefix: str | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._start = time.time()
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        if step % self.every_n_steps and step != trainer.max_steps:
            return
        self._last_step = step
        metrics = trainer.callback_metrics
        parts = [f"[{self.prefix or getattr(pl_module, 'stage', 'fit')}] step {step}" +
                 (f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else "")]
        for name, label, digits in (("train/loss", "loss", 4), ("ppo/reward", "reward", 3),
                                    ("perf/tokens_per_s", "tokens/s", 0)):
            if name in metrics:
                parts.append(f"{label} {float(metrics[name]):,.{digits}f}")
        elapsed = time.time() - self._start
        parts.append(f"{int(elapsed // 60)}:{elapsed % 60:04.1f}")
        print("  ".join(parts), file=sys.stdout, flush=True)
