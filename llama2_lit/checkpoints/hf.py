"""Hugging Face's layout (``LlamaForCausalLM.save_pretrained``): names, the RoPE row permutation,
``config.json`` both ways, reading and exporting."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from llama2_lit.checkpoints.common import (
    _LAYER_KEY, CheckpointError, TensorLike, _as_state_dict, _atomic_directory, _describe, _lazy_apply, _Loaded,
    _named_like_preset, _read_json, _read_safetensors, _shape, _torch_load, check_state_dict, expected_shapes,
    write_safetensors,
)
from llama2_lit.checkpoints.hf_tokenizer import write_hf_tokenizer
from llama2_lit.config import ModelConfig


# Meta name -> HF name, for the per-layer tensors (as transformers' ``convert_llama_weights_to_hf.py``).
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
    return _translate(state_dict, config, to_hf=True)


def hf_to_meta_state_dict(state_dict: Mapping[str, TensorLike], config: ModelConfig) -> dict[str, TensorLike]:
    """``LlamaForCausalLM`` tensor names and RoPE layout -> ours (= Meta's)."""
    return _translate(state_dict, config, to_hf=False)


def _translate(state_dict: Mapping[str, TensorLike], config: ModelConfig, *, to_hf: bool) -> dict[str, TensorLike]:
    """Rename every tensor one way or the other, permuting the rows of ``wq``/``wk`` within each head."""
    top = _HF_TOP_NAMES if to_hf else {hf: ours for ours, hf in _HF_TOP_NAMES.items()}
    layer_names = _HF_LAYER_NAMES if to_hf else {hf: ours for ours, hf in _HF_LAYER_NAMES.items()}
    layer_key, prefix = (_LAYER_KEY, "model.layers") if to_hf else (_HF_LAYER_KEY, "layers")
    permute = permute_to_hf if to_hf else permute_from_hf
    out = {}
    for key, value in state_dict.items():
        if not to_hf and key.endswith("rotary_emb.inv_freq"):
            continue  # derived buffer stored by older conversions
        if key in top:
            out[top[key]] = value
            continue
        match = layer_key.match(key)
        if match is None or match.group(2) not in layer_names:
            raise KeyError(f"tensor {key!r} " + ("has no Hugging Face Llama counterpart" if to_hf
                                                 else "is not a Hugging Face Llama tensor"))
        layer, name = match.groups()
        meta_name = name if to_hf else layer_names[name]
        heads = {"attention.wq.weight": config.n_heads, "attention.wk.weight": config.n_kv_heads}.get(meta_name)
        if heads is not None:
            value = _lazy_apply(value, lambda w, heads=heads: permute(w, heads))
        out[f"{prefix}.{layer}.{layer_names[name]}"] = value
    return out


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
        "pad_token_id": None,  # Llama 2 has no pad token (``llama/tokenizer.py``: pad_id -1)
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
