"""A Lightning ``.ckpt`` written by a stage: the core's tensors under ``model.`` in ``state_dict``,
the ``ModelConfig`` under ``checkpoint["model_config"]`` (see ``llama2_lit.stages.base``)."""

from __future__ import annotations

import re
from pathlib import Path

from llama2_lit.checkpoints.common import CheckpointError, _Loaded, _torch_load, check_state_dict
from llama2_lit.config import ModelConfig


# Wrappers that insert a path segment into parameter names: torch.compile and activation checkpointing.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def _read_lightning(path: Path) -> _Loaded:
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    if not isinstance(checkpoint.get("model_config"), dict):
        raise CheckpointError(f"{path}: no 'model_config' in the checkpoint (stages store ModelConfig.to_dict() "
                              "there; was it written by a llama2_lit stage?)")
    try:
        config = ModelConfig.from_dict(checkpoint["model_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: model_config: {error}") from None
    tensors = {}
    for name, tensor in checkpoint["state_dict"].items():
        if name.startswith("model."):  # the core lives at StageModule.model
            tensors[_WRAPPER_SEGMENTS.sub(r"\1", name.removeprefix("model."))] = tensor
    if not tensors:
        raise CheckpointError(f"{path}: no 'model.*' tensors in its state_dict")
    check_state_dict(tensors, config, source=str(path))
    recorded = checkpoint.get("tokenizer_path")
    tokenizer = Path(recorded) if isinstance(recorded, str) and Path(recorded).is_file() else None
    details = [f"its tokenizer {recorded} is missing"] if isinstance(recorded, str) and tokenizer is None else []
    return _Loaded(tensors, config, "lightning", str(path), tokenizer, details)
