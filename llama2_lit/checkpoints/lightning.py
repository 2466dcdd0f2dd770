"""A Lightning ``.ckpt`` written by a stage: the core's tensors under ``model.`` in ``state_dict``,
the ``ModelConfig`` under ``checkpoint["model_config"]`` (see ``llama2_lit.stages.base``); a stage
with several models (PPO) keeps each under its own prefix and config in ``model_configs``."""

from __future__ import annotations

import re
from pathlib import Path

from llama2_lit.checkpoints.common import CheckpointError, _Loaded, _torch_load, check_state_dict
from llama2_lit.config import ModelConfig


# Wrappers that insert a path segment into parameter names: torch.compile and activation checkpointing.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def _read_lightning(path: Path, model: str = "model") -> _Loaded:
    """The model ``model`` of a stage's ``.ckpt``: its tensors are ``state_dict["<model>.*"]`` and its
    config ``model_configs[model]`` (or ``model_config`` for the main model, ``"model"``)."""
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    configs = checkpoint.get("model_configs") if isinstance(checkpoint.get("model_configs"), dict) else {}
    values = configs.get(model, checkpoint.get("model_config") if model == "model" else None)
    if not isinstance(values, dict):
        if model != "model":
            raise CheckpointError(f"{path}: no model {model!r} in the checkpoint (its models: "
                                  f"{sorted(configs) or ['model']})")
        raise CheckpointError(f"{path}: no 'model_config' in the checkpoint (stages store ModelConfig.to_dict() "
                              "there; was it written by a llama2_lit stage?)")
    try:
        config = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: model_config of {model!r}: {error}") from None
    tensors = {}
    prefix = f"{model}."
    for name, tensor in checkpoint["state_dict"].items():
        if name.startswith(prefix):  # the core lives at StageModule.model, other models beside it
            tensors[_WRAPPER_SEGMENTS.sub(r"\1", name.removeprefix(prefix))] = tensor
    if not tensors:
        raise CheckpointError(f"{path}: no '{prefix}*' tensors in its state_dict")
    check_state_dict(tensors, config, source=f"{path} ({model})" if model != "model" else str(path))
    recorded = checkpoint.get("tokenizer_path")
    tokenizer = Path(recorded) if isinstance(recorded, str) and Path(recorded).is_file() else None
    details = [f"its tokenizer {recorded} is missing"] if isinstance(recorded, str) and tokenizer is None else []
    return _Loaded(tensors, config, "lightning", str(path), tokenizer, details)
