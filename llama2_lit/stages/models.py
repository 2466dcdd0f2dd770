"""The models of a stage: where each comes from, and the one function that builds any of them.

Pretraining and SFT own one model; the reward-model stage owns one with a scalar head; PPO owns a
policy, a value model, a frozen reference and two frozen reward models (paper section 3.2.3).
Every one of them is described by a ``ModelSource`` (a preset or an ``init_from`` checkpoint,
which heads, trainable or frozen) and built by ``build_model``, on this process's device and,
under a sharding strategy, sharded:

* **Unsharded**: the model is built on the device from the preset or loaded from ``init_from``
  (``llama2_lit.checkpoints.load_model``: ours, Meta's, Hugging Face's, or a stage's ``.ckpt``,
  which may hold several named models).
* **Sharded** (FSDP2): the model is created on the meta device (no memory), sharded
  (``llama2_lit.parallelize``), and only then materialised: rank 0 reads the checkpoint
  (memory-mapped, on CPU) and each tensor is broadcast and sliced so every rank keeps only its
  shard; a from-scratch model on GPUs is initialised shard by shard (DTensor's RNG gives each
  shard its own part of one random stream); on CPUs rank 0 builds the initial weights and they
  are broadcast the same way, so a 2-process run starts from exactly the weights of a 1-process
  run.
* **Restoring** (resume, or evaluating a checkpoint): the model is built empty with the config
  stored in the checkpoint, whose tensors then fill it; ``init_from`` is neither read nor needed.

A frozen model has ``requires_grad`` off and stays in eval mode; it is sharded like the others
(its weights are still gathered layer by layer), never in the optimizer, and never clipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from llama2_lit.config import ModelConfig
from llama2_lit.model import Transformer
from llama2_lit.parallelize import load_full_state_dict, parallelize_model
from llama2_lit.stages.strategy import fsdp_options, sharding_mesh

# Fields that may differ from an ``init_from`` checkpoint's config: they change no tensor shape.
INIT_FROM_OVERRIDABLE = frozenset({"name", "max_seq_len", "rope_theta", "notes"})


@dataclass(frozen=True)
class ModelSource:
    """Where one model of a stage comes from and what it is.

    Args:
        preset: ``ModelConfig`` preset (``nano``, ``micro``, ``llama2-7b``, ...). With
            ``init_from`` it is a check: the checkpoint must have the preset's shapes.
        init_from: a checkpoint to start from (a folder in our, Meta's or HF's layout, or a
            stage's ``.ckpt``) instead of a random initialisation.
        init_model: which model of a multi-model stage ``.ckpt`` to read (default: its main one).
        config_overrides: ``ModelConfig`` fields to change; with ``init_from`` only those that
            change no shape (``INIT_FROM_OVERRIDABLE``).
        lm_head: build the next-token head.
        scalar_head: build the scalar head (reward and value models). Added to a checkpoint that
            lacks it with ``Transformer``'s initialisation of a fresh scalar head.
        trainable: False freezes the model (no gradients, eval mode).
    """

    preset: str | None = None
    init_from: str | None = None
    init_model: str = "model"
    config_overrides: dict[str, Any] = field(default_factory=dict)
    lm_head: bool = True
    scalar_head: bool = False
    trainable: bool = True

    def __post_init__(self) -> None:
        if self.preset is None and self.init_from is None:
            raise ValueError("give a model preset (e.g. preset: nano) or a checkpoint to start from (init_from)")
        if self.preset is not None:
            ModelConfig.from_name(self.preset)  # fail now on a typo, not after the data is loaded
        if self.init_from is not None and (bad := sorted(set(self.config_overrides) - INIT_FROM_OVERRIDABLE)):
            raise ValueError(f"config_overrides {bad} would change the shapes of init_from={self.init_from}; "
                             f"only {sorted(INIT_FROM_OVERRIDABLE)} may be overridden")

    @property
    def heads(self) -> dict[str, bool]:
        return {"lm_head": self.lm_head, "scalar_head": self.scalar_head}

    def preset_config(self) -> ModelConfig:
        return ModelConfig.from_name(self.preset, **self.config_overrides)


def full_model(source: ModelSource, device: torch.device) -> Transformer:
    """The whole model on ``device``: loaded from ``source.init_from`` or freshly initialised."""
    if source.init_from is None:
        with torch.device(device):
            return Transformer(source.preset_config(), **source.heads)
    from llama2_lit.checkpoints import load_model

    model = load_model(source.init_from, device=device, model=source.init_model, **source.heads)
    if source.preset is not None:
        preset = ModelConfig.from_name(source.preset)
        # A preset and an init_from checkpoint must agree on every shape-determining field.
        mismatched = [f"{f}: checkpoint {getattr(model.config, f)}, preset {getattr(preset, f)}"
                      for f in model.config.shape_differences(preset)]
        if mismatched:
            raise ValueError(f"init_from={source.init_from} does not have the shape of preset "
                             f"{source.preset!r} ({'; '.join(mismatched)}); fix the preset or set it to null")
    # RoPE tables are built lazily from model.config, so changing non-shape fields here is safe.
    model.config = dataclasses.replace(model.config, **source.config_overrides)
    return model


def build_model(source: ModelSource, strategy: Any, *, restore_config: ModelConfig | None = None) -> Transformer:
    """Build one model of a stage on ``strategy``'s device, sharded if the strategy shards.

    ``restore_config``: build the model empty with this config; a checkpoint about to be loaded
    fills every tensor (see the module docstring).
    """
    model = _build(source, strategy, restore_config)
    if not source.trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def _build(source: ModelSource, strategy: Any, restore_config: ModelConfig | None) -> Transformer:
    device = strategy.root_device
    mesh = sharding_mesh(strategy)
    if mesh is None:
        if restore_config is not None:
            with torch.device("meta"):
                model = Transformer(restore_config, **source.heads)
            model.to_empty(device=device)  # the checkpoint fills every tensor
            return model
        return full_model(source, device)

    # Sharded: the full model exists at most on rank 0, on CPU (see the module docstring).
    restoring = restore_config is not None
    from_rank0 = not restoring and (source.init_from is not None or device.type != "cuda")
    full: Transformer | None = None
    if restoring:
        config = restore_config
    elif from_rank0:
        if strategy.global_rank == 0:
            full = full_model(source, torch.device("cpu"))
        config = ModelConfig.from_dict(strategy.broadcast(full.config.to_dict() if full is not None else None))
    else:
        config = source.preset_config()
    with torch.device("meta"):
        model = Transformer(config, **source.heads)
    parallelize_model(model, mesh, **fsdp_options(strategy))
    model.to_empty(device=device)
    if from_rank0:
        load_full_state_dict(model, full.state_dict() if full is not None else {})
        del full
    elif not restoring:
        model.reset_parameters()  # on GPU meshes DTensor draws each shard's part of one stream
    return model
