"""The base of every training stage: model build/load, optimizer + schedule, logging, FSDP-ready.

A stage (pretraining, SFT, reward model, PPO, ...) is a short subclass of ``StageModule`` that
defines its loss. Everything else is shared and lives here:

* **The core** is ``self.model``, a ``llama2_lit.model.Transformer``, built in ``configure_model``
  (not ``__init__``), so Lightning can set up the devices first: from a preset (``preset: micro``)
  or from any checkpoint (``init_from``: ours, Meta's, Hugging Face's, or a ``.ckpt`` of an earlier
  stage, through ``llama2_lit.checkpoints.load_model``). Under a sharding strategy the model is
  created on the meta device (no memory), sharded (``llama2_lit.parallelize``), and only then
  materialised: rank 0 reads the checkpoint (memory-mapped, on CPU) and each tensor is broadcast and
  sliced so every rank keeps only its shard; a from-scratch model on GPUs is initialised shard by
  shard (DTensor's RNG gives each shard its own part of one random stream); on CPUs rank 0 builds
  the initial weights and they are broadcast the same way, so a 2-process run starts from exactly
  the weights of a 1-process run.
* **Optimizer** (paper section 2.2): AdamW, betas (0.9, 0.95), eps 1e-5, weight decay 0.1, gradient
  clipping at 1.0; a cosine schedule with linear warmup that ends at 10% of the peak
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
* **Checkpoints** carry ``model_config`` (``ModelConfig.to_dict()``), ``tokenizer_path``, the RNG
  states of every rank (restored just before the first step after a resume) and the number of
  tokens seen, next to Lightning's own state (optimizer, scheduler, loops, the data-loader position
  of ``llama2_lit.data.loader.ResumableDataLoader``). Lightning 2.6 saves no RNG state in
  checkpoints (only its spawn launcher hands RNG states to child processes), hence ours.
"""

from __future__ import annotations

import dataclasses
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

from llama2_lit.config import ModelConfig
from llama2_lit.model import Transformer
from llama2_lit.parallelize import load_full_state_dict, parallelize_model
from llama2_lit.stages.strategy import fsdp_options, sharding_mesh
from llama2_lit.stages.throughput import PeakFlops, ThroughputMeter, peak_flops

# Fields that may differ from an ``init_from`` checkpoint's config: they change no tensor shape.
_INIT_FROM_OVERRIDABLE = frozenset({"name", "max_seq_len", "rope_theta", "notes"})
# Fields that determine the tensor shapes (a preset and an init_from checkpoint must agree on them).
_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")


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

    def __init__(self, preset: str | None = "nano", init_from: str | None = None,
                 config_overrides: dict[str, Any] | None = None, tokenizer_path: str | None = None,
                 lr: float = 3e-4, warmup_steps: int = 2000, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-5,
                 weight_decay: float = 0.1, decay_embeddings: bool = True, grad_clip: float | None = 1.0,
                 peak_flops: float | None = None) -> None:
        super().__init__()
        if preset is None and init_from is None:
            raise ValueError("give a model preset (e.g. preset: nano) or a checkpoint to start from (init_from)")
        if preset is not None:
            ModelConfig.from_name(preset)  # fail now on a typo, not after the data is loaded
        # tokenizer_path is kept out of hparams: Lightning refuses to log a module and a data module
        # whose hparams share a key with different values, and the data module usually has it.
        self.save_hyperparameters(ignore=["tokenizer_path"])
        self.tokenizer_path = tokenizer_path
        self.model: Transformer | None = None
        self.tokens_seen = 0
        self._restore_config: ModelConfig | None = None
        self._pending_rng_states: list[dict[str, Any]] | None = None
        self._meter: ThroughputMeter | None = None

    # ------------------------------------------------------------------------------ the core
    @property
    def config(self) -> ModelConfig:
        if self.model is None:
            raise RuntimeError("the model is built in configure_model(); call it (or trainer.fit) first")
        return self.model.config

    def restore_weights_from_checkpoint(self, config: ModelConfig) -> None:
        """Build the model with ``config`` and leave its weights to a checkpoint about to be loaded.

        The CLI calls this when resuming or evaluating a checkpoint: ``init_from`` is then neither
        read (it may be large, or gone) nor needed.
        """
        self._restore_config = config

    def _preset_config(self) -> ModelConfig:
        overrides = dict(self.hparams.config_overrides or {})
        return ModelConfig.from_name(self.hparams.preset, **overrides)

    def _full_model(self, device: torch.device) -> Transformer:
        """The whole model on ``device``: loaded from ``init_from`` or freshly initialised."""
        heads = {"lm_head": self.lm_head, "scalar_head": self.scalar_head}
        if self.hparams.init_from is None:
            with torch.device(device):
                return Transformer(self._preset_config(), **heads)
        from llama2_lit.checkpoints import load_model

        overrides = dict(self.hparams.config_overrides or {})
        if bad := sorted(set(overrides) - _INIT_FROM_OVERRIDABLE):
            raise ValueError(f"config_overrides {bad} would change the shapes of init_from={self.hparams.init_from}; "
                             f"only {sorted(_INIT_FROM_OVERRIDABLE)} may be overridden")
        model = load_model(self.hparams.init_from, device=device, **heads)
        if self.hparams.preset is not None:
            preset = ModelConfig.from_name(self.hparams.preset)
            mismatched = [f"{f}: checkpoint {getattr(model.config, f)}, preset {getattr(preset, f)}"
                          for f in _SHAPE_FIELDS if getattr(model.config, f) != getattr(preset, f)]
            if mismatched:
                raise ValueError(f"init_from={self.hparams.init_from} does not have the shape of preset "
                                 f"{self.hparams.preset!r} ({'; '.join(mismatched)}); fix the preset or set it to null")
        # RoPE tables are built lazily from model.config, so changing non-shape fields here is safe.
        model.config = dataclasses.replace(model.config, **overrides)
        return model

    def configure_model(self) -> None:
        """Build ``self.model`` on this process's device, sharded if the strategy shards."""
        if self.model is not None:
            return  # Lightning calls this hook again for every fit/validate/test
        strategy = self.trainer.strategy
        device = strategy.root_device
        mesh = sharding_mesh(strategy)
        heads = {"lm_head": self.lm_head, "scalar_head": self.scalar_head}
        if mesh is None:
            if self._restore_config is not None:
                with torch.device("meta"):
                    model = Transformer(self._restore_config, **heads)
                model.to_empty(device=device)  # the checkpoint fills every tensor
            else:
                model = self._full_model(device)
            self.model = model
            return

        # Sharded: the full model exists at most on rank 0, on CPU (see the module docstring).
        restoring = self._restore_config is not None
        from_rank0 = not restoring and (self.hparams.init_from is not None or device.type != "cuda")
        full: Transformer | None = None
        if restoring:
            config = self._restore_config
        elif from_rank0:
            if strategy.global_rank == 0:
                full = self._full_model(torch.device("cpu"))
            config = ModelConfig.from_dict(strategy.broadcast(full.config.to_dict() if full is not None else None))
        else:
            config = self._preset_config()
        with torch.device("meta"):
            model = Transformer(config, **heads)
        parallelize_model(model, mesh, **fsdp_options(strategy))
        model.to_empty(device=device)
        if from_rank0:
            load_full_state_dict(model, full.state_dict() if full is not None else {})
            del full
        elif not restoring:
            model.reset_parameters()  # on GPU meshes DTensor draws each shard's part of one stream
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)

    # ------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = optimizer_param_groups(self.model, hp.weight_decay, decay_embeddings=hp.decay_embeddings)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        total = hp.total_steps if hp.total_steps is not None else self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the cosine schedule needs a length: set trainer.max_steps, trainer.max_epochs, "
                             "or model.init_args.total_steps")
        if hp.warmup_steps >= total:
            raise ValueError(f"warmup_steps={hp.warmup_steps} >= the {int(total)} steps of the run: the learning "
                             "rate would never reach its peak; lower model.init_args.warmup_steps")
        schedule = WarmupCosine(hp.warmup_steps, int(total), hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Clipping lives here (not in Trainer.gradient_clip_val) so the pre-clip norm is logged and
        # the same code clips plain and sharded (DTensor) gradients.
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
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
        finite = all(bool(torch.isfinite(_local(p.detach())).all()) for p in self.model.parameters())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"the weights became non-finite by step {self.global_step}; refusing to overwrite the last good "
                f"checkpoint ({self._last_checkpoint() or 'none yet'}). Lower the learning rate and resume from it."
            )

    def check_batch(self, batch: dict[str, Tensor], required: tuple[str, ...]) -> None:
        """Check a batch against the contract once, so a data bug fails here and not deep in torch."""
        missing = [key for key in required if key not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} expects batch keys {list(required)}; missing {missing} "
                           f"(got {sorted(batch)})")
        input_ids = batch["input_ids"]
        vocab = self.config.vocab_size
        if input_ids.dtype != torch.long or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq) long tensor, got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's max_seq_len "
                             f"{self.config.max_seq_len} (config_overrides: {{max_seq_len: ...}})")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"token ids span [{int(input_ids.min())}, {int(input_ids.max())}] but the model's "
                             f"vocab_size is {vocab}: was the data encoded with another tokenizer?")
        labels = batch.get("labels")
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
            real = labels[labels != -100]
            if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
                raise ValueError(f"labels outside [0, {vocab}) other than -100 (the ignore index)")

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
        input_ids = batch["input_ids"]
        if self._meter is None:
            world = self.trainer.world_size
            self._meter = ThroughputMeter(self.config.flops_per_token(input_ids.shape[1]), self.peak, world)
            self._meter.start()
            return  # the first step carries one-off costs (allocations, thread pools): not timed
        self._meter.update(input_ids.numel())
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
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_finite_weights()
        checkpoint["model_config"] = self.config.to_dict()
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
