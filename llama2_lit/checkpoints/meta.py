"""Meta's layout (the ``facebookresearch/llama`` download): ``params.json`` + ``consolidated.NN.pth``,
one file per model-parallel rank, merged here lazily."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from llama2_lit.checkpoints.common import (
    _LAYER_KEY, CheckpointError, LazyTensor, TensorLike, _Loaded, _named_like_preset, _read_json, _shape,
    _torch_load, check_state_dict,
)
from llama2_lit.config import ModelConfig


# Dimension along which Meta's model-parallel layers split each tensor (the fairscale layers of Meta's
# ``llama/model.py``); None = replicated.
_META_SHARD_DIM = {
    "tok_embeddings.weight": 1,  # ParallelEmbedding splits the embedding dimension
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,  # ColumnParallelLinear
    "attention.wo.weight": 1,  # RowParallelLinear
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None,
    "output.weight": 0,
}
_META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "max_seq_len", "max_batch_size"}
_META_SHARD_FILE = re.compile(r"^consolidated\.(\d+)\.pth$")


def meta_shard_dim(name: str) -> int | None:
    """The dimension along which Meta's checkpoint shards split tensor ``name`` (None: replicated)."""
    match = _LAYER_KEY.match(name)
    key = match.group(2) if match else name
    if key not in _META_SHARD_DIM:
        raise KeyError(name)
    return _META_SHARD_DIM[key]


def _meta_shard_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if _META_SHARD_FILE.match(p.name)),
                   key=lambda p: int(_META_SHARD_FILE.match(p.name).group(1)))
    ranks = [int(_META_SHARD_FILE.match(p.name).group(1)) for p in files]
    if ranks != list(range(len(files))):
        raise CheckpointError(f"{folder}: model-parallel shards must be consolidated.00.pth ... consolidated."
                              f"{len(files) - 1:02d}.pth without gaps; found {[p.name for p in files]}")
    return files


def _meta_config(params_path: Path, vocab_size: int, fallback_name: str) -> ModelConfig:
    params = _read_json(params_path)
    unknown = sorted(set(params) - _META_PARAMS)
    if unknown:
        raise CheckpointError(f"{params_path}: unknown key {unknown[0]!r} (known: {sorted(_META_PARAMS)}); "
                              "not a Llama 2 params.json?")
    params.pop("max_batch_size", None)
    if params.get("vocab_size", -1) == -1:
        params["vocab_size"] = vocab_size  # Meta fills in tokenizer.n_words at load time
    elif params["vocab_size"] != vocab_size:
        raise CheckpointError(f"{params_path}: vocab_size={params['vocab_size']} but tok_embeddings.weight has "
                              f"{vocab_size} rows")
    try:
        return _named_like_preset(ModelConfig(**params), fallback_name)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{params_path}: {error}") from None


def _merge_meta_shards(shards: list[dict[str, Tensor]], files: list[Path]) -> dict[str, TensorLike]:
    """One tensor per name: concatenated lazily along its model-parallel dim, or shard 0's if replicated."""
    names = list(shards[0])
    for shard, path in zip(shards[1:], files[1:]):
        if set(shard) != set(names):
            extra, lost = sorted(set(shard) - set(names)), sorted(set(names) - set(shard))
            raise CheckpointError(f"{path}: holds different tensors than {files[0].name}: "
                                  f"extra {extra[:3]}, missing {lost[:3]}")
    merged: dict[str, TensorLike] = {}
    for name in names:
        if name == "rope.freqs":
            merged[name] = shards[0][name]
            continue
        try:
            dim = meta_shard_dim(name)
        except KeyError:
            raise CheckpointError(f"{files[0]}: unexpected tensor {name!r} (not part of a Llama 2 model)") from None
        pieces = [shard[name] for shard in shards]
        _check_shard_shapes(name, pieces, dim, files)
        if dim is None or len(pieces) == 1:
            merged[name] = pieces[0]
        else:
            shape = list(pieces[0].shape)
            shape[dim] = sum(piece.shape[dim] for piece in pieces)
            merged[name] = LazyTensor(tuple(shape), pieces[0].dtype,
                                      lambda pieces=pieces, dim=dim: torch.cat(pieces, dim=dim))
    return merged


def _check_shard_shapes(name: str, pieces: list[Tensor], dim: int | None, files: list[Path]) -> None:
    """Replicated tensors agree exactly; split ones have the same shape on every rank (Meta splits evenly)."""
    first = tuple(pieces[0].shape)
    for piece, path in zip(pieces[1:], files[1:]):
        if tuple(piece.shape) != first:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(piece.shape)} but {files[0].name} has "
                                  f"{first}; model-parallel shards of one checkpoint must agree")
        if dim is None and not torch.equal(piece, pieces[0]):
            raise CheckpointError(f"{path}: replicated tensor {name!r} differs from {files[0].name}'s copy")


def _check_rope_freqs(freqs: Tensor, config: ModelConfig, source: str) -> None:
    """Meta stores the RoPE inverse frequencies; they must agree with ``rope_theta`` (``precompute_freqs_cis`` in ``llama/model.py``)."""
    expected = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    if tuple(freqs.shape) != tuple(expected.shape) or not torch.allclose(freqs.double(), expected, rtol=1e-2):
        raise CheckpointError(f"{source}: 'rope.freqs' does not match rope_theta={config.rope_theta} and "
                              f"head_dim={config.head_dim} (wrong rope_theta in params.json?)")


def _read_meta(folder: Path) -> _Loaded:
    files = _meta_shard_files(folder)
    shards = [_torch_load(path) for path in files]
    for shard, path in zip(shards, files):
        if not isinstance(shard, dict) or not all(isinstance(v, Tensor) for v in shard.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a Meta consolidated checkpoint)")
    tensors = _merge_meta_shards(shards, files)
    source = f"{folder}/consolidated.*.pth ({len(files)} shard{'s' * (len(files) > 1)})"
    if "tok_embeddings.weight" not in tensors:
        raise CheckpointError(f"{source}: missing tensor 'tok_embeddings.weight'")
    config = _meta_config(folder / "params.json", _shape(tensors["tok_embeddings.weight"])[0], folder.name)
    freqs = tensors.pop("rope.freqs", None)
    try:
        check_state_dict(tensors, config, source=source)
    except CheckpointError as error:
        raise CheckpointError(f"params.json disagrees with the tensors: {error}") from None
    if freqs is not None:
        _check_rope_freqs(freqs, config, source)
    tokenizer = folder / "tokenizer.model"
    return _Loaded(tensors, config, "meta", source, tokenizer if tokenizer.is_file() else None,
                   [f"{len(files)} shard{'s' * (len(files) > 1)}"])
