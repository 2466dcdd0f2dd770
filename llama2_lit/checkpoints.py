"""Checkpoint interop: Meta's layout, Hugging Face's layout, our own, and Lightning's.

The same Llama 2 weights travel in three folder layouts (plus the ``.ckpt`` files our stages write):

* **Meta** (the ``facebookresearch/llama`` download): ``params.json`` + ``consolidated.NN.pth``,
  one file per model-parallel rank. Tensor names are ours (``model.py`` uses Meta's names). Each
  matrix is split along the dimension its parallel layer splits (spec section 1.4): column-parallel
  layers (``wq``/``wk``/``wv``, ``w1``/``w3``, ``output``) along dim 0, row-parallel layers
  (``wo``, ``w2``) and the embedding along dim 1; norms are replicated. ``params.json`` stores
  ``vocab_size: -1`` (filled from the tensors here) and omits ``n_kv_heads``/``rope_theta`` when
  they take their defaults. The files also carry ``rope.freqs``, a derived RoPE table we check
  and drop.
* **Hugging Face** (``LlamaForCausalLM.save_pretrained``): ``config.json`` + ``model.safetensors``,
  or shards listed by ``model.safetensors.index.json``, or older ``pytorch_model*.bin``. Names
  differ, and HF rotates half-split pairs instead of Meta's interleaved pairs, so it stores
  ``wq``/``wk`` with their rows permuted within each head (spec section 1.3).
* **Ours**: ``config.json`` (a ``ModelConfig``) + ``model.safetensors`` in Meta's names, and the
  ``tokenizer.model`` it was trained with.
* **Lightning** ``.ckpt`` written by a stage: ``state_dict`` with the core under ``model.``, the
  ``ModelConfig`` under ``checkpoint["model_config"]`` (see ``llama2_lit.stages.base``).

Safety: nothing is unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``
or safetensors), so a checkpoint from the internet cannot run code.

Memory: every file is memory-mapped; tensors that must be computed (merged Meta shards, HF
permutations, dtype casts) are ``LazyTensor`` recipes, materialised one at a time by the
streaming safetensors writer. Converting a 7B checkpoint therefore needs about one tensor of RAM
beyond the page cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import Tensor, nn

from llama2_lit.config import PRESETS, ModelConfig
from llama2_lit.model import Transformer

Format = Literal["lit", "meta", "hf", "lightning"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config; the message names the file and tensor."""


# ============================================================================ lazy tensors
@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype, computed only when ``materialize()`` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    compute: Callable[[], Tensor]

    def materialize(self) -> Tensor:
        return self.compute()


TensorLike = Tensor | LazyTensor


def _shape(value: TensorLike) -> tuple[int, ...]:
    return tuple(value.shape)


def _materialize(value: TensorLike) -> Tensor:
    return value.materialize() if isinstance(value, LazyTensor) else value


def _lazy_apply(value: TensorLike, fn: Callable[[Tensor], Tensor]) -> TensorLike:
    """``fn(value)`` now for a real tensor; deferred for a lazy one (``fn`` keeps shape and dtype)."""
    if isinstance(value, LazyTensor):
        return LazyTensor(value.shape, value.dtype, lambda: fn(value.materialize()))
    return fn(value)


def _cast(value: TensorLike, dtype: torch.dtype | None) -> TensorLike:
    if dtype is None or value.dtype == dtype:
        return value
    # Deferred even for real tensors: a cast of a memory-mapped file is a new full copy.
    return LazyTensor(_shape(value), dtype, lambda: _materialize(value).to(dtype))


# ============================================================================ Meta <-> HF names
# Meta name -> HF name, for the per-layer tensors (spec section 1.4).
_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "score.weight": "score.weight",  # LlamaForSequenceClassification's head (num_labels=1): reward models
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def permute_to_hf(weight: Tensor, n_heads: int) -> Tensor:
    """Meta interleaved-pair rows -> HF half-split rows, within each head.

    Row order inside a head becomes ``[0, 2, 4, ..., hd-2, 1, 3, ..., hd-1]``.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(weight: Tensor, n_heads: int) -> Tensor:
    """Inverse of ``permute_to_hf``: HF half-split rows -> Meta interleaved-pair rows."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_state_dict(state_dict: Mapping[str, TensorLike], config: ModelConfig) -> dict[str, TensorLike]:
    """Our (= Meta's) tensor names and RoPE layout -> ``LlamaForCausalLM``'s."""
    out = {}
    for key, value in state_dict.items():
        if key in _HF_TOP_NAMES:
            out[_HF_TOP_NAMES[key]] = value
            continue
        match = _LAYER_KEY.match(key)
        if match is None or match.group(2) not in _HF_LAYER_NAMES:
            raise KeyError(f"tensor {key!r} has no Hugging Face Llama counterpart")
        layer, name = match.groups()
        if name == "attention.wq.weight":
            value = _lazy_apply(value, lambda w: permute_to_hf(w, config.n_heads))
        elif name == "attention.wk.weight":
            value = _lazy_apply(value, lambda w: permute_to_hf(w, config.n_kv_heads))
        out[f"model.layers.{layer}.{_HF_LAYER_NAMES[name]}"] = value
    return out


def hf_to_meta_state_dict(state_dict: Mapping[str, TensorLike], config: ModelConfig) -> dict[str, TensorLike]:
    """``LlamaForCausalLM`` tensor names and RoPE layout -> ours (= Meta's)."""
    top = {hf: ours for ours, hf in _HF_TOP_NAMES.items()}
    layer_names = {hf: ours for ours, hf in _HF_LAYER_NAMES.items()}
    out = {}
    for key, value in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # derived buffer stored by older conversions
        if key in top:
            out[top[key]] = value
            continue
        match = _HF_LAYER_KEY.match(key)
        if match is None or match.group(2) not in layer_names:
            raise KeyError(f"tensor {key!r} is not a Hugging Face Llama tensor")
        layer, name = match.groups()
        ours = layer_names[name]
        if ours == "attention.wq.weight":
            value = _lazy_apply(value, lambda w: permute_from_hf(w, config.n_heads))
        elif ours == "attention.wk.weight":
            value = _lazy_apply(value, lambda w: permute_from_hf(w, config.n_kv_heads))
        out[f"layers.{layer}.{ours}"] = value
    return out


# ============================================================================ validation
def expected_shapes(config: ModelConfig, *, lm_head: bool = True, scalar_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``Transformer`` with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(config, lm_head=lm_head, scalar_head=scalar_head)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_state_dict(state_dict: Mapping[str, TensorLike], config: ModelConfig, *, source: str) -> None:
    """Every tensor present with the shape ``config`` implies, nothing else; else a ``CheckpointError``.

    Which heads are expected (``output``, ``score``) is read from the state dict; one is required.
    """
    lm_head, scalar_head = "output.weight" in state_dict, "score.weight" in state_dict
    if not (lm_head or scalar_head):
        raise CheckpointError(f"{source}: no head: neither 'output.weight' (LM head) nor 'score.weight' (scalar head)")
    expected = expected_shapes(config, lm_head=lm_head, scalar_head=scalar_head)
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}"
                              + _and_more(unexpected) + " (not part of a Llama 2 model)")
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}" + _and_more(missing))
    for name, shape in expected.items():
        if _shape(state_dict[name]) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {_shape(state_dict[name])} but the config "
                                  f"({_describe(config)}) implies {shape}")


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more: {', '.join(names[1:4])}{', ...' if len(names) > 4 else ''})" \
        if len(names) > 1 else ""


def _describe(config: ModelConfig) -> str:
    return (f"dim={config.dim}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
            f"n_kv_heads={config.n_kv_heads}, hidden_dim={config.hidden_dim}, vocab_size={config.vocab_size}")


def _named_like_preset(config: ModelConfig, fallback: str) -> ModelConfig:
    """Name an imported config after the preset with the same shapes (``llama2-7b``), else ``fallback``."""
    shape_fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta")
    for name, preset in PRESETS.items():
        if all(getattr(preset, f) == getattr(config, f) for f in shape_fields) \
                and preset.hidden_dim == config.hidden_dim:
            return dataclasses.replace(config, name=name, unconfirmed=preset.unconfirmed, notes=preset.notes)
    return dataclasses.replace(config, name=fallback)


# ============================================================================ file readers
def _torch_load(path: Path) -> dict:
    """``torch.load`` that only unpickles tensors and plain containers, memory-mapped."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "zipfile" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 format: no mmap
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), None)
        if reason is None:  # not a refused object: a damaged or foreign file
            detail = next((line for line in str(error).splitlines() if "Unsupported" in line), str(error)[:200])
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail.strip()})") from None
        raise CheckpointError(
            f"{path}: refusing to unpickle it: it holds more than tensors and plain containers ({reason}). "
            "Checkpoints are loaded with torch.load(weights_only=True) so that a file cannot run code."
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, memory-mapped (not read until used)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


@dataclass
class _Loaded:
    """What a reader found: tensors in our names (maybe lazy), the config, and where they came from."""

    tensors: dict[str, TensorLike]
    config: ModelConfig
    format: Format
    source: str
    tokenizer_path: Path | None = None
    details: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- ours
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


# ---------------------------------------------------------------------------- Meta
# Dimension along which Meta's model-parallel layers split each tensor (spec section 1.4); None = replicated.
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
    """Meta stores the RoPE inverse frequencies; they must agree with ``rope_theta`` (spec 1.3)."""
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


# ---------------------------------------------------------------------------- Hugging Face
def ffn_size_parameters(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` for which Meta's FFN formula gives ``intermediate_size``.

    Preference: Llama 2's own ``multiple_of=256`` without multiplier (7B, 13B); other powers of
    two; then the multiplier closest to ``intermediate_size / int(8 * dim / 3)`` with the fewest
    decimals (70B: 1.3 with 4096). Always solvable: ``multiple_of=intermediate_size`` rounds any
    smaller hidden size up to it.
    """
    def hidden(multiple_of: int, multiplier: float | None) -> int:
        return ModelConfig(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).hidden_dim

    powers = [256] + [2 ** k for k in range(13, -1, -1) if 2 ** k != 256]
    for multiple_of in powers:
        if hidden(multiple_of, None) == intermediate_size:
            return multiple_of, None
    ratio = intermediate_size / int(8 * dim / 3)
    for decimals in (1, 2, 3):
        multiplier = round(ratio, decimals)
        for multiple_of in powers:
            if multiplier > 0 and hidden(multiple_of, multiplier) == intermediate_size:
                return multiple_of, multiplier
    multiplier = None if intermediate_size >= int(8 * dim / 3) else ratio
    if hidden(intermediate_size, multiplier) == intermediate_size:
        return intermediate_size, multiplier
    raise CheckpointError(f"no multiple_of/ffn_dim_multiplier reproduce intermediate_size={intermediate_size} "
                          f"for dim={dim}")


def config_from_hf(hf: Mapping, *, name: str = "custom", source: str = "config.json") -> ModelConfig:
    """A ``ModelConfig`` for a Hugging Face Llama ``config.json``; anything not Llama 2 is an error."""
    def need(key: str):
        if key not in hf:
            raise CheckpointError(f"{source}: missing field {key!r}")
        return hf[key]

    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{source}: model_type={hf.get('model_type')!r}; only 'llama' checkpoints are supported")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "head_dim": (hf.get("head_dim") or dim // n_heads, dim // n_heads),
        "rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
    }
    for key, (value, llama2) in unsupported.items():
        if value != llama2:
            raise CheckpointError(f"{source}: {key}={value!r} is not Llama 2's ({llama2!r}); not supported")
    multiple_of, multiplier = ffn_size_parameters(dim, need("intermediate_size"))
    try:
        return ModelConfig(
            name=name, dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=need("vocab_size"),
            multiple_of=multiple_of, ffn_dim_multiplier=multiplier, norm_eps=need("rms_norm_eps"),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_seq_len=hf.get("max_position_embeddings", 4096), init_std=hf.get("initializer_range", 0.02),
        )
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None


def _hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: from an index if there is one, else the single file."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' listing the tensors")
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            for path in files:
                if not path.is_file():
                    raise CheckpointError(f"{index_path}: lists {path.name}, which is missing")
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: config.json but no weights (model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin or pytorch_model.bin.index.json)")


def _read_hf(folder: Path) -> _Loaded:
    config = config_from_hf(_read_json(folder / "config.json"), name=folder.name,
                            source=str(folder / "config.json"))
    config = _named_like_preset(config, folder.name)
    files = _hf_weight_files(folder)
    hf_tensors: dict[str, Tensor] = {}
    for path in files:
        loaded = _read_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)
        for name, tensor in loaded.items():
            if name in hf_tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is also in another weight file")
            hf_tensors[name] = tensor
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} weight files)"
    tensors = hf_to_meta_state_dict(_check_hf_tensors(hf_tensors, config, source), config)
    check_state_dict(tensors, config, source=source)
    tokenizer = folder / "tokenizer.model"
    return _Loaded(tensors, config, "hf", source, tokenizer if tokenizer.is_file() else None,
                   [f"{len(files)} weight file{'s' * (len(files) > 1)}"])


def _check_hf_tensors(tensors: dict[str, Tensor], config: ModelConfig, source: str) -> dict[str, Tensor]:
    """Names and shapes in HF terms, before the q/k permutation reshapes by heads (which would fail deep in ``view``)."""
    expected = {(_HF_TOP_NAMES[k] if k in _HF_TOP_NAMES else _hf_layer_name(k)): shape
                for k, shape in expected_shapes(config, scalar_head=True).items()}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # derived buffer stored by older conversions, dropped by hf_to_meta_state_dict
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (not a Hugging Face Llama tensor)")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the config "
                                  f"({_describe(config)}) implies {expected[name]}")
    return tensors


def _hf_layer_name(ours: str) -> str:
    layer, name = _LAYER_KEY.match(ours).groups()
    return f"model.layers.{layer}.{_HF_LAYER_NAMES[name]}"


# ---------------------------------------------------------------------------- Lightning
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
    tokenizer = checkpoint.get("tokenizer_path")
    tokenizer = Path(tokenizer) if isinstance(tokenizer, str) and Path(tokenizer).is_file() else None
    return _Loaded(tensors, config, "lightning", str(path), tokenizer)


# ============================================================================ detection + loading
def detect_format(path: str | Path) -> Format:
    """Which layout ``path`` holds: ``lit``, ``meta``, ``hf`` (folders) or ``lightning`` (a ``.ckpt`` file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth") and not _META_SHARD_FILE.match(path.name):
            return "lightning"
        raise CheckpointError(f"{path}: a single file must be a Lightning .ckpt; for Meta, HF or our format "
                              "pass the folder")
    names = {p.name for p in path.iterdir()}
    if (path / ".metadata").is_file() or path.suffix == ".ckpt":
        raise CheckpointError(
            f"{path}: a sharded (torch.distributed.checkpoint) directory. Its .metadata is a pickle, which this "
            "loader does not unpickle; if you trust it (your own run), consolidate it into one file first: "
            f"llama2-lit consolidate {path} {path.with_suffix('')}-consolidated.ckpt")
    if "params.json" in names and any(_META_SHARD_FILE.match(n) for n in names):
        return "meta"
    if "config.json" in names:
        config = _read_json(path / "config.json")
        if "dim" in config and "n_layers" in config:
            return "lit"
        if "model_type" in config or "hidden_size" in config:
            return "hf"
        raise CheckpointError(f"{path / 'config.json'}: neither our ModelConfig (dim, n_layers, ...) nor a Hugging "
                              "Face config (model_type, hidden_size, ...)")
    raise CheckpointError(f"{path}: not a checkpoint folder. Expected params.json + consolidated.NN.pth (Meta), "
                          f"config.json + weights (Hugging Face or ours); found {sorted(names)[:8]}")


_READERS: dict[str, Callable[[Path], _Loaded]] = {
    "lit": _read_lit, "meta": _read_meta, "hf": _read_hf, "lightning": _read_lightning,
}


def _load(path: str | Path, *, model: str = "model") -> _Loaded:
    """Read any layout; every reader validates names and shapes against the config it found.

    ``model`` picks one model of a multi-model stage ``.ckpt``; other layouts hold one model.
    """
    path = Path(path)
    layout = detect_format(path)
    if layout == "lightning":
        return _read_lightning(path, model)
    if model != "model":
        raise CheckpointError(f"{path}: a {layout} checkpoint holds one model; model={model!r} names a model of "
                              "a multi-model stage .ckpt")
    return _READERS[layout](path)


def load_checkpoint(path: str | Path, *, model: str = "model") -> tuple[dict[str, Tensor], ModelConfig]:
    """State dict in our (Meta's) names and the ``ModelConfig``, from any supported layout
    (``model``: which model of a multi-model stage ``.ckpt``, see ``load_model``).

    Tensors keep the checkpoint's dtype; files are memory-mapped, so tensors that needed no
    computation stay backed by the file until written to (copy on write).
    """
    loaded = _load(path, model=model)
    return {name: _materialize(value) for name, value in loaded.tensors.items()}, loaded.config


def load_model(path: str | Path, *, lm_head: bool = True, scalar_head: bool = False,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               model: str = "model") -> Transformer:
    """A ``Transformer`` with the checkpoint's weights (in ``dtype`` on ``device``).

    ``model`` names one model of a stage ``.ckpt`` that holds several (PPO's ``value``, ...;
    ``checkpoint["model_configs"]``); the default is the stage's main model.

    The model is built on the meta device and takes the loaded tensors, so no time is spent on an
    initialisation that is overwritten. A head the checkpoint lacks: ``score`` gets a fresh
    initialisation (reward models start from the SFT model, paper 3.2.2); a missing LM head is an
    error. A head the checkpoint has but the caller did not ask for is dropped.
    """
    loaded = _load(path, model=model)
    config = loaded.config
    if lm_head and "output.weight" not in loaded.tensors:
        raise CheckpointError(f"{loaded.source}: no LM head ('output.weight'); it is a scalar-head model "
                              "(load it with lm_head=False, scalar_head=True)")
    with torch.device("meta"):
        built = Transformer(config, lm_head=lm_head, scalar_head=scalar_head)
    wanted = built.state_dict().keys()
    state = {name: _materialize(value).to(device=device, dtype=dtype, copy=True)
             for name, value in loaded.tensors.items() if name in wanted}
    fresh_score = scalar_head and "score.weight" not in state
    if fresh_score:
        state["score.weight"] = torch.empty(1, config.dim, device=device, dtype=dtype)
    built.load_state_dict(state, strict=True, assign=True)
    if fresh_score:
        built.reset_scalar_head()
    return built


# ============================================================================ writers
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: str | Path, tensors: Mapping[str, TensorLike], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file one tensor at a time; returns its size in bytes.

    ``safetensors.torch.save_file`` first turns every tensor into a bytes object (a second copy of
    the whole model); this writer materialises, writes and frees one tensor at a time. Format: an
    8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets; padded
    with spaces to 8 bytes), then the raw little-endian data.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, value in tensors.items():
        if value.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {value.dtype} has no safetensors code")
        size = math.prod(_shape(value)) * value.dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[value.dtype], "shape": list(_shape(value)),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(len(header_bytes).to_bytes(8, "little"))
        file.write(header_bytes)
        for name, value in tensors.items():
            tensor = _materialize(value).detach().to("cpu").contiguous()
            if tuple(tensor.shape) != tuple(header[name]["shape"]) or tensor.dtype != value.dtype:
                raise CheckpointError(f"tensor {name!r} materialised as {tuple(tensor.shape)} {tensor.dtype}, "
                                      f"announced as {header[name]['shape']} {value.dtype}")
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return 8 + len(header_bytes) + offset


@contextmanager
def _atomic_directory(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``out_dir``, on failure it vanishes.

    An existing non-empty ``out_dir`` is an error unless ``overwrite``; it is replaced only after
    the new folder is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (out_dir.is_file() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty (overwrite=True / --overwrite replaces it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = tmp.with_suffix(".old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _as_state_dict(model_or_state_dict: nn.Module | Mapping[str, TensorLike]) -> dict[str, TensorLike]:
    if isinstance(model_or_state_dict, nn.Module):
        return {name: tensor.detach() for name, tensor in model_or_state_dict.state_dict().items()}
    return {name: value.detach() if isinstance(value, Tensor) else value for name, value in model_or_state_dict.items()}


def _copy_tokenizer(tokenizer_path: str | Path | None, out_dir: Path) -> Path | None:
    if tokenizer_path is None:
        return None
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_path}")
    return Path(shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model"))


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


# ---------------------------------------------------------------------------- HF export
def hf_config_dict(config: ModelConfig, *, dtype: torch.dtype = torch.float32, lm_head: bool = True,
                   scalar_head: bool = False, bos_token_id: int = 1, eos_token_id: int = 2) -> dict:
    """The ``config.json`` of a Hugging Face Llama with this shape (readable by transformers 4 and 5)."""
    architectures = (["LlamaForCausalLM"] if lm_head else []) + (["LlamaForSequenceClassification"] if scalar_head else [])
    values = {
        "architectures": architectures,
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,  # Llama 2 has no pad token (spec section 2)
        "dtype": str(dtype).removeprefix("torch."),
    }
    if scalar_head:
        values["num_labels"] = 1
    return values


def _shard_by_size(tensors: Mapping[str, TensorLike], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, value in tensors.items():
        nbytes = math.prod(_shape(value)) * value.dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def export_hf(state_dict: nn.Module | Mapping[str, TensorLike], config: ModelConfig, out_dir: str | Path, *,
              tokenizer_path: str | Path | None = None, max_shard_bytes: int = 5_000_000_000,
              overwrite: bool = False) -> Path:
    """Hugging Face layout, loadable by ``LlamaForCausalLM.from_pretrained`` (same logits).

    ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + index when larger than
    ``max_shard_bytes``), ``config.json``, and with a tokenizer: ``tokenizer.model``,
    ``tokenizer.json`` and ``tokenizer_config.json`` (see ``write_hf_tokenizer``). A scalar head is
    kept as ``score.weight``, which ``LlamaForSequenceClassification`` (num_labels=1) loads.
    """
    state = _as_state_dict(state_dict)
    check_state_dict(state, config, source="export_hf")
    hf_state = meta_to_hf_state_dict(state, config)
    dtypes = {value.dtype for value in hf_state.values()}
    bos_id, eos_id = 1, 2
    if tokenizer_path is not None:
        from llama2_lit.tokenizer import Tokenizer
        tokenizer = Tokenizer(tokenizer_path)
        bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    with _atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        shards = _shard_by_size(hf_state, max_shard_bytes)
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", hf_state)
        else:
            weight_map, total = {}, 0
            for k, names in enumerate(shards, start=1):
                file_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                total += write_safetensors(tmp / file_name, {n: hf_state[n] for n in names})
                weight_map.update(dict.fromkeys(names, file_name))
            index = {"metadata": {"total_size": sum(math.prod(_shape(v)) * v.dtype.itemsize for v in hf_state.values())},
                     "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = hf_config_dict(config, dtype=max(dtypes, key=lambda d: d.itemsize), lm_head="output.weight" in state,
                                   scalar_head="score.weight" in state, bos_token_id=bos_id, eos_token_id=eos_id)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer_path is not None:
            write_hf_tokenizer(tokenizer_path, tmp, model_max_length=config.max_seq_len)
    return Path(out_dir)


def write_hf_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, *, model_max_length: int = 4096) -> None:
    """``tokenizer.model`` + ``tokenizer.json`` + ``tokenizer_config.json`` that encode exactly like ours.

    Why a ``tokenizer.json``: given only ``tokenizer.model``, transformers 5 builds its
    ``LlamaTokenizer`` with BPE merges ranked by piece *id* and a ``Metaspace`` pre-tokenizer that
    skips the dummy prefix when the text starts with a space. Both differ from SentencePiece on
    runs of spaces (e.g. "a  b", "  x"): a third of random whitespace-heavy strings encode
    differently. Here the merges are ranked by piece *score*, as SentencePiece's BPE merges, and
    the dummy prefix is prepended by the normalizer (the "legacy" Llama behaviour, applied to
    every chunk between special tokens, as Meta encodes each chunk separately). BOS is added,
    EOS is not (Meta's ``encode(bos=True, eos=False)``). ``PreTrainedTokenizerFast`` loads the
    file as is in transformers 4 and 5.

    One difference remains by design: HF matches the special tokens' text (``"<s>"``) inside a
    string, SentencePiece never does.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(tokenizer_path, out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    bpe = models.BPE(vocab=vocab, merges=_merges_by_score(pieces, vocab), unk_token=sp.id_to_piece(sp.unk_id()),
                     fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    special = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tokenizer.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    bos = sp.id_to_piece(sp.bos_id())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": sp.id_to_piece(sp.eos_id()), "unk_token": sp.id_to_piece(sp.unk_id()),
        "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length, "padding_side": "left",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _merges_by_score(pieces: list[tuple[str, float]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every ``(left, right)`` pair whose concatenation is a piece, best piece score first."""
    merges = []
    for piece, score in pieces:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((score, len(left), len(right), vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], -m[1], -m[2], m[3], m[4]))
    return [(m[5], m[6]) for m in merges]


# ============================================================================ CLI
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(src: str | Path, dst: str | Path, *, to: Literal["lit", "hf"] = "lit",
            tokenizer_path: str | Path | None = None, dtype: torch.dtype | None = None,
            overwrite: bool = False) -> str:
    """Convert ``src`` (any layout) to ``dst`` in our layout or HF's; returns a one-line summary.

    The tokenizer is the one given, else the one found with the source (``tokenizer.model`` in
    its folder, or ``tokenizer_path`` of a Lightning checkpoint).
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"source and destination are the same path: {src}")
    start = time.perf_counter()
    loaded = _load(src)
    tensors = {name: _cast(value, dtype) for name, value in loaded.tensors.items()}
    tokenizer = tokenizer_path if tokenizer_path is not None else loaded.tokenizer_path
    if to == "lit":
        save_model(tensors, loaded.config, dst, tokenizer_path=tokenizer, overwrite=overwrite)
    elif to == "hf":
        export_hf(tensors, loaded.config, dst, tokenizer_path=tokenizer, overwrite=overwrite)
    else:
        raise ValueError(f"unknown target layout {to!r}; choose 'lit' or 'hf'")
    n_params = sum(math.prod(_shape(v)) for v in tensors.values())
    size = sum(p.stat().st_size for p in dst.iterdir())
    dtypes = ",".join(sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()}))
    details = ", ".join([*loaded.details, f"{n_params / 1e6:,.1f}M params", dtypes])
    return (f"converted {loaded.format} {src} ({loaded.config.name}: {details}) -> {to} {dst} "
            f"({size / 1e6:,.1f} MB{', with tokenizer' if tokenizer else ''}) in {time.perf_counter() - start:.1f} s")


def convert_main(argv: list[str] | None = None) -> int:
    """``llama2-lit convert SRC DST [--to lit|hf] [--tokenizer PATH] [--dtype D] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="llama2-lit convert",
        description="Convert a checkpoint (Meta, Hugging Face, ours or a Lightning .ckpt; detected) to our "
                    "layout or Hugging Face's.")
    parser.add_argument("src", type=Path, help="checkpoint folder (Meta / HF / ours) or a Lightning .ckpt file")
    parser.add_argument("dst", type=Path, help="output folder (written atomically)")
    parser.add_argument("--to", choices=("lit", "hf"), default="lit", help="output layout (default: lit, ours)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model to include (default: the one found with the source, if any)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the weights (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.src, args.dst, to=args.to, tokenizer_path=args.tokenizer,
                          dtype=_DTYPES.get(args.dtype), overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError) as error:
        print(f"llama2-lit convert: error: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0
