"""The base of every training stage: model build/load, optimizer + schedule, logging, FSDP-ready.

A stage (pretraining, SFT, reward model, PPO, ...) is a short subclass of ``StageModule`` that
defines its loss. Everything else is shared and lives here:

* **The models.** The core is ``self.model``, a ``llama2_lit.model.Transformer``, built in
  ``configure_model`` (not ``__init__``), so Lightning can set up the devices first: from a preset
  (``preset: micro``) or from any checkpoint (``init_from``: ours, Meta's, Hugging Face's, or a
  ``.ckpt`` of an earlier stage). A stage may own several models (PPO: policy, value, frozen
  reference, frozen reward models): ``model_sources()`` names each with its ``ModelSource``
  (preset or ``init_from``, heads, trainable or frozen) and ``llama2_lit.stages.models.build_model``
  builds every one the same way, sharded under FSDP2 (see that module).
* **The batch contract** (``batch_contract``): which keys a batch holds and which of them are
  token ids. ``check_batch`` checks the first batch against it, and the token counts
  (``train/tokens``, ``perf/tokens_per_s``) come from ``batch_tokens``, so a preference batch
  (chosen and rejected sequences) is counted like any other.
* **Optimizer** (paper section 2.2): AdamW, betas (0.9, 0.95), eps 1e-5, weight decay 0.1, gradient
  clipping at 1.0 over every trainable parameter of the stage; a cosine schedule with linear warmup that ends at 10% of the peak
  (``warmup_cosine_lr``, a pure function of the step).
* **Weight decay** applies to every matrix (attention, feed-forward, output head, scalar head,
  and by default the token embeddings) and not to the RMSNorm gains. A gain starts at 1, and
  decay pulls it toward 0, not toward its initial value, i.e. it would shrink every normalised
  activation for no reason; nanoGPT, Megatron and HF's Trainer exempt norms for the same reason.
  The paper does not say; ``decay_embeddings: false`` exempts the embeddings too (GPT-3-style
  codebases differ on this).
* **Logged every ``log_every_n_steps``**: ``train/loss``, ``train/lr``, ``train/grad_norm`` (before
  clipping), ``train/tokens`` (seen so far), ``perf/tokens_per_s`` and ``perf/mfu`` (see
  ``throughput.py`` for which peak MFU is measured against).
* **Safety**: a non-finite loss stops training with ``NonFiniteLossError`` before the bad step
  updates anything, and a checkpoint is never written from non-finite weights, so the last
  checkpoint on disk is always a good one.
* **Checkpoints** carry ``model_config`` (the main model's ``ModelConfig.to_dict()``),
  ``model_configs`` (every model's, by name: ``checkpoints.load_model(path, model=name)`` reads
  any of them back), ``tokenizer_path``, the RNG
  states of every rank (restored just before the first step after a resume) and the number of
  tokens seen, next to Lightning's own state (optimizer, scheduler, loops, the data-loader position
  of ``llama2_lit.data.loader.ResumableDataLoader``). Lightning 2.6 saves no RNG state in
  checkpoints (only its spawn launcher hands RNG states to child processes), hence ours.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from llama2_lit.config import IGNORE_INDEX, ModelConfig
from llama2_lit.model import Transformer
from llama2_lit.stages.models import ModelSource, build_model
from llama2_lit.stages.strategy import fsdp_options, sharding_mesh
from llama2_lit.stages.throughput import PeakFlops, ThroughputMeter, peak_flops


@dataclass(frozen=True)
class BatchContract:
    """What a stage reads from a batch (the formats of ``llama2_lit.data.datamodules``).

    ``required``: keys every batch has. ``token_ids``: (B, T) token-id tensors, checked against the
    vocabulary and the context length and counted as the batch's tokens. ``same_shape``: (key,
    token-id key) pairs that must have equal shapes (labels, attention masks). ``labels``: target
    ids, in the vocabulary or -100 (no target).
    """

    required: tuple[str, ...]
    token_ids: tuple[str, ...]
    same_shape: tuple[tuple[str, str], ...] = ()
    labels: tuple[str, ...] = ()


LM_BATCH = BatchContract(required=("input_ids", "labels"), token_ids=("input_ids",),
                         same_shape=(("labels", "input_ids"),), labels=("labels",))
"""Pretraining and SFT: ``input_ids`` and pre-shifted ``labels``."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (or weights); it was stopped, the last checkpoint is good."""


# ------------------------------------------------------------------------------------ schedule
def warmup_cosine_lr(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
                     min_lr_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step ``step`` (0-based), paper section 2.2.

    Linear warmup: ``peak * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (the
    first step already learns; the last warmup step is at the peak). Then cosine decay from the
    peak at step ``warmup_steps`` to ``min_lr_ratio * peak`` at step ``total_steps``; constant
    after that.
    """
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"bad schedule: warmup_steps={warmup_steps}, total_steps={total_steps}, "
                         f"min_lr_ratio={min_lr_ratio}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = min_lr_ratio * peak_lr
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return min_lr if decay_steps > 0 else peak_lr
    progress = (step - warmup_steps) / decay_steps
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupCosine:
    """``LambdaLR`` multiplier form of ``warmup_cosine_lr`` (a dataclass, so its state is saved)."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        return warmup_cosine_lr(step, peak_lr=1.0, warmup_steps=self.warmup_steps,
                                total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio)


def optimizer_param_groups(model: nn.Module, weight_decay: float, *,
                           decay_embeddings: bool = True) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on matrices, none on norm gains (and optionally embeddings).

    See the module docstring for why. Every trainable parameter lands in exactly one group.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_gain = parameter.ndim < 2  # RMSNorm weights (the model has no biases)
        is_embedding = name.endswith("tok_embeddings.weight")
        (no_decay if is_gain or (is_embedding and not decay_embeddings) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, CUDA), in types ``weights_only`` loads."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# ------------------------------------------------------------------------------------ the base
class StageModule(L.LightningModule):
    """Shared machinery of all stages; subclasses define ``training_step``/``validation_step``.

    Args:
        preset: ``ModelConfig`` preset to build (``nano``, ``micro``, ``llama2-7b``, ...). With
            ``init_from`` it is a check: the checkpoint must have the preset's shapes.
        init_from: start from these weights (a folder in our, Meta's or HF's layout, or a stage's
            ``.ckpt``) instead of a random initialisation.
        config_overrides: ``ModelConfig`` fields to change, e.g. ``{max_seq_len: 256}``. With
            ``init_from`` only fields that change no shape (``max_seq_len``, ``rope_theta``, ``name``).
        tokenizer_path: the tokenizer the data was encoded with; recorded in every checkpoint
            (default: the data module's ``tokenizer_path`` when it has one).
        lr: peak learning rate (pretraining 7B/13B: 3e-4, paper Table 1; SFT: 2e-5, section 3.1).
        warmup_steps: linear warmup steps (paper: 2000 for pretraining).
        total_steps: steps of the whole cosine; default: the Trainer's total (``max_steps``, or
            epochs x batches / accumulation).
        min_lr_ratio: final learning rate as a fraction of the peak (paper: 0.1).
        betas, eps, weight_decay: AdamW's (paper: (0.9, 0.95), 1e-5, 0.1).
        decay_embeddings: apply weight decay to the token embeddings too.
        grad_clip: clip the global gradient norm to this (paper: 1.0); None: no clipping.
        peak_flops: FLOP/s per device that MFU is measured against; None: datasheet table on
            known GPUs, a measured matmul peak otherwise.
    """

    stage: ClassVar[str] = "stage"
    """Short name of the stage: run names, W&B job type, run directory."""
    lm_head: ClassVar[bool] = True
    scalar_head: ClassVar[bool] = False
    batch_contract: ClassVar[BatchContract] = LM_BATCH
    """The batch this stage reads: checked once (``check_batch``) and counted (``batch_tokens``)."""

    def __init__(self, preset: str | None = "nano", init_from: str | None = None,
                 config_overrides: dict[str, Any] | None = None, tokenizer_path: str | None = None,
                 lr: float = 3e-4, warmup_steps: int = 2000, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-5,
                 weight_decay: float = 0.1, decay_embeddings: bool = True, grad_clip: float | None = 1.0,
                 peak_flops: float | None = None) -> None:
        super().__init__()
        ModelSource(preset=preset, init_from=init_from)  # fail now on a typo, not after the data is loaded
        # tokenizer_path is kept out of hparams: Lightning refuses to log a module and a data module
        # whose hparams share a key with different values, and the data module usually has it.
        self.save_hyperparameters(ignore=["tokenizer_path"])
        self.tokenizer_path = tokenizer_path
        self.model: Transformer | None = None
        self.tokens_seen = 0
        self._model_names: tuple[str, ...] = ("model",)
        self._restore_configs: dict[str, ModelConfig] | None = None
        self._pending_rng_states: list[dict[str, Any]] | None = None
        self._meter: ThroughputMeter | None = None

    # ------------------------------------------------------------------------------ the core
    @property
    def config(self) -> ModelConfig:
        if self.model is None:
            raise RuntimeError("the model is built in configure_model(); call it (or trainer.fit) first")
        return self.model.config

    def model_sources(self) -> dict[str, ModelSource]:
        """The models this stage owns, by attribute name; ``"model"`` is the main one.

        The default is one trainable model from the stage's own arguments, with the heads the
        class declares (``lm_head``, ``scalar_head``). A stage with several models (PPO: policy,
        value, frozen reference and reward models) returns one ``ModelSource`` per model; each is
        built by ``llama2_lit.stages.models.build_model`` and set as ``self.<name>``.
        """
        hp = self.hparams
        return {"model": ModelSource(preset=hp.preset, init_from=hp.init_from,
                                     config_overrides=dict(hp.config_overrides or {}),
                                     lm_head=self.lm_head, scalar_head=self.scalar_head)}

    def stage_models(self) -> dict[str, Transformer]:
        """The models built so far, by attribute name (empty before ``configure_model``)."""
        return {name: getattr(self, name) for name in self._model_names if getattr(self, name, None) is not None}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer updates and clipping covers, over all models of the stage."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def restore_weights_from_checkpoint(self, config: ModelConfig,
                                        model_configs: dict[str, dict[str, Any]] | None = None) -> None:
        """Build the models with these configs and leave their weights to a checkpoint about to be loaded.

        ``config`` is the main model's (``checkpoint["model_config"]``), ``model_configs`` every
        model's (``checkpoint["model_configs"]``, by name). The CLI calls this when resuming or
        evaluating a checkpoint: ``init_from`` is then neither read (it may be large, or gone) nor
        needed.
        """
        configs = {name: ModelConfig.from_dict(values) for name, values in (model_configs or {}).items()}
        configs.setdefault("model", config)
        self._restore_configs = configs

    def configure_model(self) -> None:
        """Build every model of ``model_sources`` on this process's device, sharded if the strategy shards."""
        if self.model is not None:
            return  # Lightning calls this hook again for every fit/validate/test
        sources = self.model_sources()
        if "model" not in sources:
            raise ValueError(f"{type(self).__name__}.model_sources() must name its main model 'model'")
        self._model_names = tuple(sources)
        restore = self._restore_configs or {}
        if restore and (missing := sorted(set(sources) - set(restore))):
            raise ValueError(f"the checkpoint being restored has no config for model(s) {missing} "
                             f"(it has {sorted(restore)})")
        for name, source in sources.items():
            setattr(self, name, build_model(source, self.trainer.strategy, restore_config=restore.get(name)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)

    # ------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Over the whole stage: every trainable model's parameters (frozen ones are skipped).
        groups = optimizer_param_groups(self, hp.weight_decay, decay_embeddings=hp.decay_embeddings)
        # fused: one kernel for the whole update. PyTorch's default on the CPU is a Python loop over
        # the parameters: 48 ms a step for the micro model's 6.5M against 4 ms fused (the same
        # update up to float rounding: 6e-8 apart after 20 steps), 14% of a micro PPO iteration,
        # whose four mini-batches each take a step.
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=True)
        total = hp.total_steps if hp.total_steps is not None else self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the cosine schedule needs a length: set trainer.max_steps, trainer.max_epochs, "
                             "or model.init_args.total_steps")
        warmup = self.warmup_steps_for(int(total))
        if warmup >= total:
            raise ValueError(f"warmup_steps={warmup} >= the {int(total)} steps of the run: the learning "
                             "rate would never reach its peak; lower model.init_args.warmup_steps")
        schedule = WarmupCosine(warmup, int(total), hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps`` optimizer steps (here: ``warmup_steps`` as given)."""
        return self.hparams.warmup_steps

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Clipping lives here (not in Trainer.gradient_clip_val) so the pre-clip norm is logged and
        # the same code clips plain and sharded (DTensor) gradients.
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.log("train/grad_norm", grad_norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------------------ safety
    def check_finite_loss(self, loss: Tensor, batch_idx: int) -> None:
        """Stop with a clear message when any rank's loss is NaN/inf (one host sync per step)."""
        finite = bool(torch.isfinite(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        raise NonFiniteLossError(
            f"non-finite training loss ({loss.item() if not finite else 'on another rank'}) at step "
            f"{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}); training stopped before "
            f"this step changed anything. Last good checkpoint: {self._last_checkpoint() or 'none yet'}. "
            "Lower the learning rate or check the data, then resume from it with --ckpt_path."
        )

    def _last_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        return path or None

    def _check_finite_weights(self) -> None:
        finite = all(bool(torch.isfinite(_local(p.detach())).all()) for p in self.parameters())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"the weights became non-finite by step {self.global_step}; refusing to overwrite the last good "
                f"checkpoint ({self._last_checkpoint() or 'none yet'}). Lower the learning rate and resume from it."
            )

    def check_batch(self, batch: dict[str, Tensor], required: tuple[str, ...] | None = None) -> None:
        """Check a batch against the stage's ``batch_contract`` once, so a data bug fails here and not deep in torch.

        ``required`` replaces the contract's list of required keys.
        """
        contract = self.batch_contract
        required = contract.required if required is None else required
        missing = [key for key in required if key not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} expects batch keys {list(required)}; missing {missing} "
                           f"(got {sorted(batch)})")
        vocab = self.config.vocab_size
        for key in contract.token_ids:
            ids = batch[key]
            if ids.dtype != torch.long or ids.dim() != 2:
                raise ValueError(f"{key} must be a (batch, seq) long tensor, got {tuple(ids.shape)} {ids.dtype}")
            if ids.shape[1] > self.config.max_seq_len:
                raise ValueError(f"sequence length {ids.shape[1]} of {key} exceeds the model's max_seq_len "
                                 f"{self.config.max_seq_len} (config_overrides: {{max_seq_len: ...}})")
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise ValueError(f"token ids of {key} span [{int(ids.min())}, {int(ids.max())}] but the model's "
                                 f"vocab_size is {vocab}: was the data encoded with another tokenizer?")
        for key, ids_key in contract.same_shape:
            if key in batch and batch[key].shape != batch[ids_key].shape:
                raise ValueError(f"{key} {tuple(batch[key].shape)} and {ids_key} {tuple(batch[ids_key].shape)} "
                                 "differ in shape")
        for key in contract.labels:
            labels = batch.get(key)
            if labels is not None:
                real = labels[labels != IGNORE_INDEX]
                if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
                    raise ValueError(f"{key} outside [0, {vocab}) other than {IGNORE_INDEX} (the ignore index)")

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        """Token positions of a batch on this rank (padding included): what ``train/tokens`` and
        ``perf/tokens_per_s`` count. The sum over the contract's token-id tensors (a preference
        pair counts its chosen and its rejected sequence); PPO-like stages override it."""
        return sum(batch[key].numel() for key in self.batch_contract.token_ids)

    def model_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs a training step spends per counted token (MFU's numerator): one forward and
        backward of the core (``ModelConfig.flops_per_token``). Stages that run more models override it."""
        return self.config.flops_per_token(seq_len)

    def batch_seq_len(self, batch: dict[str, Tensor]) -> int:
        """Sequence length of a batch, for the attention FLOPs of MFU."""
        return max(batch[key].shape[-1] for key in self.batch_contract.token_ids)

    # ------------------------------------------------------------------------------ logging
    def on_fit_start(self) -> None:
        if self.trainer.gradient_clip_val:
            raise ValueError("clip gradients with model.init_args.grad_clip (logged, FSDP-aware), "
                             "not trainer.gradient_clip_val")
        if self.hparams.peak_flops is not None:
            peak = PeakFlops(float(self.hparams.peak_flops), "given (model.init_args.peak_flops)")
        else:
            bf16 = str(self.trainer.precision).startswith(("bf16", "16"))
            bf16 = bf16 or (sharding_mesh(self.trainer.strategy) is not None and
                            fsdp_options(self.trainer.strategy).get("param_dtype") in (torch.bfloat16, torch.float16))
            peak = peak_flops(self.device, bf16=bf16)
        self.peak = peak
        self._meter = None  # started at the first batch
        if self.trainer.is_global_zero:
            print(f"[{self.stage}] {self.config.name}: {self.config.num_parameters():,} parameters; "
                  f"precision {self.trainer.precision}; "
                  f"MFU is against {peak.flops / 1e9:,.0f} GFLOP/s per device ({peak.source})")

    def log_throughput(self, batch: dict[str, Tensor]) -> None:
        """Tokens/s and MFU over the steps since the last log (called from ``on_train_batch_end``)."""
        if self._meter is None:
            world = self.trainer.world_size
            self._meter = ThroughputMeter(self.model_flops_per_token(self.batch_seq_len(batch)), self.peak, world)
            self._meter.start()
            return  # the first step carries one-off costs (allocations, thread pools): not timed
        self._meter.update(self.batch_tokens(batch))
        if self.trainer._logger_connector.should_update_logs:
            rates = self._meter.compute()
            if rates:
                self.log("perf/tokens_per_s", rates["tokens_per_s"])
                self.log("perf/mfu", rates["mfu"])
            self.log("train/tokens", float(self.tokens_seen))

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log_throughput(batch)

    def on_validation_start(self) -> None:
        if self._meter is not None:
            self._meter.pause()

    def on_validation_end(self) -> None:
        if self._meter is not None:
            self._meter.resume()

    # ------------------------------------------------------------------------------ checkpoints
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng_states is not None:
            # Restored here, at the point in the step sequence where they were saved (end of the
            # previous step), not at load time: data-loader set-up draws random numbers in between.
            states, self._pending_rng_states = self._pending_rng_states, None
            rank = self.trainer.global_rank
            if len(states) == self.trainer.world_size:
                set_rng_state(states[rank])
            elif rank == 0:
                print(f"[{self.stage}] RNG states not restored: the checkpoint has {len(states)} ranks, "
                      f"this run {self.trainer.world_size}")
        # Counted before the step, so a checkpoint written at its end includes this batch.
        self.tokens_seen += self.batch_tokens(batch) * self.trainer.world_size

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_finite_weights()
        checkpoint["model_config"] = self.config.to_dict()
        # One config per model (by attribute name), so load_model(path, model=name) reads any of them.
        checkpoint["model_configs"] = {name: model.config.to_dict() for name, model in self.stage_models().items()}
        checkpoint["tokenizer_path"] = self._tokenizer_path()
        checkpoint["tokens_seen"] = self.tokens_seen
        state = rng_state()
        if dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        self._pending_rng_states = checkpoint.get("rng_states")

    def _tokenizer_path(self) -> str | None:
        path = self.tokenizer_path
        if path is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            path = getattr(datamodule, "tokenizer_path", None)
        return None if path is None else str(Path(path).resolve())
