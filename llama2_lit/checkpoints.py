"""Checkpoint interop: Meta's layout, Hugging Face's layout and our own.

Our state dict uses Meta's names and Meta's RoPE pair convention (see ``model.py``), so a Meta
consolidated checkpoint maps onto it one to one. Hugging Face's ``LlamaForCausalLM`` rotates
half-split pairs instead and stores ``wq``/``wk`` with their rows permuted within each head
(spec section 1.3); the functions below undo and redo that permutation.
"""

from __future__ import annotations

import re

from torch import Tensor

from llama2_lit.config import ModelConfig

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


def meta_to_hf_state_dict(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
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
            value = permute_to_hf(value, config.n_heads)
        elif name == "attention.wk.weight":
            value = permute_to_hf(value, config.n_kv_heads)
        out[f"model.layers.{layer}.{_HF_LAYER_NAMES[name]}"] = value
    return out


def hf_to_meta_state_dict(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
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
            value = permute_from_hf(value, config.n_heads)
        elif ours == "attention.wk.weight":
            value = permute_from_hf(value, config.n_kv_heads)
        out[f"layers.{layer}.{ours}"] = value
    return out
