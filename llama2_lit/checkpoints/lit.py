"""Our folder layout: ``config.json`` (a ``ModelConfig``) + ``model.safetensors`` in Meta's names,
and the ``tokenizer.model`` it was trained with."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from llama2_lit.checkpoints.common import (
    CheckpointError, TensorLike, _as_state_dict, _atomic_directory, _copy_tokenizer, _Loaded, _read_json,
    _read_safetensors, check_state_dict, write_safetensors,
)
from llama2_lit.config import ModelConfig


def _read_lit(folder: Path) -> _Loaded:
    config_path = folder / "config.json"
    values = _read_json(config_path)
    try:
        config = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: {error}") from None
    tensors = _read_safetensors(folder / "model.safetensors")
    check_state_dict(tensors, config, source=str(folder / "model.safetensors"))
    tokenizer = folder / "tokenizer.model"
    return _Loaded(tensors, config, "lit", str(folder / "model.safetensors"),
                   tokenizer if tokenizer.is_file() else None)


def save_model(model_or_state_dict: nn.Module | Mapping[str, TensorLike], config: ModelConfig, out_dir: str | Path,
               *, tokenizer_path: str | Path | None = None, overwrite: bool = False) -> Path:
    """Our format: ``model.safetensors`` (Meta names) + ``config.json`` (+ ``tokenizer.model``)."""
    state = _as_state_dict(model_or_state_dict)
    check_state_dict(state, config, source="save_model")
    with _atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors", state, metadata={"llama2_lit_config": config.name})
        config.save(tmp / "config.json")
        _copy_tokenizer(tokenizer_path, tmp)
    return Path(out_dir)
