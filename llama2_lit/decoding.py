"""Generation's forward passes (prefill and single-token steps), rebuilt for speed at inference time.

A decoding step of a small model is not limited by its matmuls' arithmetic but by the number of
operators it dispatches and by how fast each matmul reads its weights: the micro model's step
through ``Transformer.hidden_states`` is ~35 operators per layer around 7 one-row matmuls.
``FusedDecoder`` computes the same function with the weights rearranged once, when generation
starts, from the model's own (Meta-named) parameters, which it leaves untouched:

* **Fused matmuls.** ``wq``, ``wk`` and ``wv`` are one ``(q + k + v, dim)`` matrix and ``w1``,
  ``w3`` one ``(2 * hidden, dim)`` matrix (the fusion inference engines make), so a layer runs 4
  matmuls instead of 7. Each RMSNorm's weight is folded into the columns of the matrix that
  reads the norm (``(x * r * g) @ W^T == (x * r) @ (W * g)^T``), and the norm itself is three
  vectorised operators instead of torch's composite ``rms_norm`` (~8).
* **Prepacked weights on the CPU.** Where torch has oneDNN, each matrix is reordered once into
  oneDNN's blocked layout and multiplied by its linear kernel: on the AMD EPYC we measure on,
  that is ~2x faster than ``F.linear`` in fp32 (which goes to MKL) for one row, 16 rows and a
  prefill of 750 rows alike, and ~1.5x in bf16. Elsewhere (GPUs) the fused matrices go to ``F.linear``.
* **One RoPE product for queries and keys.** Both are rotated by their position's row of the
  precomputed table in one complex product (in fp32, as Meta's ``apply_rotary_emb``), with the
  attention scale ``1/sqrt(head_dim)`` folded into the queries' rows of it.
* **Grouped-query attention without repeating K/V** (paper A.2.1). In a decoding step the
  ``n_heads / n_kv_heads`` query heads that share a KV head are that head's query rows:
  ``(batch, kv_heads, rep, head_dim) @ (batch, kv_heads, head_dim, keys)``, a softmax, and one more
  matmul (a fused attention kernel gains nothing for one query). It runs in fp32 for bf16 models
  too: the CPU's bf16 batched matmul copies its operands and is slower than converting them.
  Padding adds one ``-inf`` bias per step, shared by every layer; unpadded batches need none. The
  prefill calls SDPA with ``enable_gqa``, as the model does.
* **Few operators per step.** The cache's per-layer views (the slot a token writes, the keys and
  values it reads) are taken once per step for all layers; the cache writes are in place into
  the preallocated ``KVCache``, which stays the model's kind, so ``KVCache.keep_rows`` (dropping
  finished rows) works as before. The prefill computes the LM head at each row's last position only.

The arithmetic is the model's, so greedy decoding gives the tokens of the model's own path (and
of Hugging Face's); values differ in the last bits (fp32) or bf16 digit (bf16), as any reordering
of a sum does. The fused weights are a copy; ``fused_decoder`` keeps the last model's between
``generate`` calls while none of its parameters has changed (building it costs ~10 decoding
steps of the micro model), and only for models whose copy is small. Where the model must run as
a module, ``FusedDecoder.supports`` says no and ``generate`` keeps the model's own path:
FSDP-sharded models (their forward runs the all-gathers of FSDP's hooks) and calls under
autocast (the model's path defines autocast's casts).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from llama2_lit.model import KVCache, Transformer


def onednn_linear_available(device: torch.device) -> bool:
    """Whether the oneDNN linear kernel with prepacked weights can be used on ``device``."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# oneDNN's reorder picks its blocked layout for an expected number of rows (any number works):
# the layout for 16 rows measured fastest for 1 and 16 rows alike, and for a 750-row prefill.
PACKED_ROWS = 16
# The most bytes of fused weights ``fused_decoder`` keeps between calls (a course model's copy;
# a large model's is rebuilt per call, a small cost next to its decoding steps).
KEPT_BYTES = 1 << 30


class FusedDecoder:
    """``prefill(prompt_ids, cache, padding_mask)`` and ``step(tokens, cache)``: next-token logits
    (fp32, one row per sequence) as ``model(..., cache=cache)[:, -1]`` computes them, cache advanced.

    Built from a ``Transformer`` with an LM head (see ``supports``); its parameters are read, not
    kept: a later change to them is not seen (``fused_decoder`` rebuilds it then). ``prepack``:
    use oneDNN's prepacked weights (default: where ``onednn_linear_available``), else ``F.linear``.
    """

    def __init__(self, model: Transformer, *, prepack: bool | None = None) -> None:
        config = model.config
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.hidden_dim = config.hidden_dim
        self.qk_v, self.q_k = [self.q_size + self.kv_size, self.kv_size], [config.n_heads, config.n_kv_heads]
        params = {_plain_name(name): p.detach() for name, p in model.named_parameters()}
        self.embeddings = params["tok_embeddings.weight"]
        device = self.embeddings.device
        if prepack and not onednn_linear_available(device):
            raise ValueError(f"oneDNN's prepacked linear is not available on {device}")
        self.packed_rows = PACKED_ROWS if (onednn_linear_available(device) if prepack is None else prepack) else None
        self._linear = _onednn_linear if self.packed_rows else F.linear
        # Each RMSNorm's weight is folded into the matrix that reads the norm (``_matrix``).
        self.eps_tensor = torch.tensor(config.norm_eps, device=device)
        self.layers = []  # (wqkv, wo, w13, w2) per block
        for i in range(config.n_layers):
            p = {name.removeprefix(f"layers.{i}."): t for name, t in params.items() if name.startswith(f"layers.{i}.")}
            self.layers.append((
                self._matrix(p["attention.wq.weight"], p["attention.wk.weight"], p["attention.wv.weight"],
                             norm=p["attention_norm.weight"]),
                self._matrix(p["attention.wo.weight"]),
                self._matrix(p["feed_forward.w1.weight"], p["feed_forward.w3.weight"], norm=p["ffn_norm.weight"]),
                self._matrix(p["feed_forward.w2.weight"]),
            ))
        self.output = self._matrix(params["output.weight"], norm=params["norm.weight"])
        self.freqs_cis = model.freqs_cis(device)
        # The attention scale, folded into the queries' rows of the rotation (the keys' stay 1).
        self.rotation_scale = torch.ones(self.n_heads + self.n_kv_heads, 1, device=device)
        self.rotation_scale[:self.n_heads] = 1.0 / math.sqrt(self.head_dim)

    @staticmethod
    def supports(model: Transformer) -> bool:
        """Whether ``FusedDecoder`` computes ``model``'s generation (else use the model's own path)."""
        parameter = next(model.parameters())
        return (model.output is not None and not hasattr(parameter, "to_local")  # FSDP2 DTensors
                and not torch.is_autocast_enabled(parameter.device.type))

    # ------------------------------------------------------------------------------ weights
    def _matrix(self, *weights: Tensor, norm: Tensor | None = None) -> Tensor:
        """``weights`` stacked along the output dimension, times the weight of the RMSNorm that
        feeds them (``(x * r * g) @ W^T == (x * r) @ (W * g)^T``; the product in fp32, rounded
        once), prepacked for oneDNN where it is used."""
        weight = torch.cat(weights) if len(weights) > 1 else weights[0].contiguous()
        if norm is not None:
            weight = (weight.float() * norm.float()).to(weight.dtype)
        if self.packed_rows is None:
            return weight
        # Private operators: the oneDNN linear that torch.compile's CPU backend (inductor) emits
        # for frozen linear layers; torch is pinned, and ``onednn_linear_available`` guards them.
        return torch.ops.mkldnn._reorder_linear_weight(weight, self.packed_rows)

    def _normalize(self, x: Tensor) -> Tensor:
        """RMSNorm of ``x`` (rows, dim) without its weight (folded into the next matrix):
        ``x * rsqrt(mean(x^2) + eps)``, in three vectorised operators instead of torch's composite
        rms_norm (~8), with ``mean(x^2) = |x|^2 / dim``; in fp32 (as Meta's RMSNorm), cast back."""
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        normed = x * torch.addcmul(self.eps_tensor, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
        return normed if x.dtype == torch.float32 else normed.to(x.dtype)

    # ------------------------------------------------------------------------------ forward
    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Logits (batch, vocab) after one new real token per row (``tokens``, shape (batch,))."""
        batch, past = tokens.shape[0], cache.length
        if past + 1 > cache.max_seq_len:
            raise ValueError(f"sequence of {past + 1} tokens exceeds the cache length of {cache.max_seq_len}")
        heads, kv_heads, head_dim, linear = self.n_heads, self.n_kv_heads, self.head_dim, self._linear
        # Every layer's view of the cache in a few operators per step, not a few per layer: the
        # slot this token writes, and the keys (transposed) and values it attends to.
        n_keys = past + 1
        key_slots, value_slots = cache.keys.select(3, past).unbind(0), cache.values.select(3, past).unbind(0)
        keys_t = cache.keys.narrow(3, 0, n_keys).transpose(-1, -2).unbind(0)  # (batch, kv_heads, head_dim, keys)
        values = cache.values.narrow(3, 0, n_keys).unbind(0)
        cache.key_mask[:, past] = True
        bias = None
        if cache.has_padding:  # padding slots stay masked: one -inf bias for every layer
            bias = torch.zeros(batch, 1, 1, n_keys, device=tokens.device) \
                .masked_fill_(~cache.key_mask[:, None, None, :n_keys], float("-inf"))
        rotation = self.freqs_cis[cache.n_real][:, None, :] * self.rotation_scale  # (batch, heads + kv, hd/2)
        x = F.embedding(tokens, self.embeddings)
        fp32 = x.dtype == torch.float32  # no casts to dispatch (each operator counts here)
        for layer_id, (wqkv, wo, w13, w2) in enumerate(self.layers):
            qk, v = linear(self._normalize(x), wqkv).split(self.qk_v, 1)
            # Queries and keys rotated together, in fp32 (Meta's apply_rotary_emb); the cache
            # write casts the keys back to the cache's dtype.
            qk = qk.view(batch, heads + kv_heads, head_dim // 2, 2)
            qk = torch.view_as_real(torch.view_as_complex(qk if fp32 else qk.float()) * rotation)
            q, k = qk.view(batch, heads + kv_heads, head_dim).split(self.q_k, 1)
            key_slots[layer_id].copy_(k)
            value_slots[layer_id].copy_(v.view(batch, kv_heads, head_dim))
            # The query heads of each KV head are its query rows: (batch, kv_heads, rep, keys).
            # Attention is computed in fp32: the CPU's bf16 batched matmul copies its operands
            # and is slower than converting them.
            keys, vals = (keys_t[layer_id], values[layer_id]) if fp32 else \
                (keys_t[layer_id].float(), values[layer_id].float())
            scores = q.view(batch, kv_heads, heads // kv_heads, head_dim) @ keys
            if bias is not None:
                scores = scores + bias
            attended = (scores.softmax(-1) @ vals).view(batch, self.q_size)
            x = x + linear(attended if fp32 else attended.to(x.dtype), wo)
            gate, up = linear(self._normalize(x), w13).chunk(2, 1)
            x = x + linear(F.silu(gate) * up, w2)
        cache.n_real += 1
        cache.length += 1
        return self._logits(x)

    def prefill(self, prompt_ids: Tensor, cache: KVCache, padding_mask: Tensor | None = None) -> Tensor:
        """Logits (batch, vocab) at the last real token of each row of ``prompt_ids`` (batch, seq),
        written into an empty ``cache``. ``padding_mask`` (batch, seq): 1 on real tokens; None:
        every token is real.

        The blocks run on the real tokens only (a left-padded batch of ragged prompts is up to
        half padding); attention reads them in the padded layout, where padding holds zeros,
        is masked, and stays masked in the cache.
        """
        batch, seq = prompt_ids.shape
        if cache.length != 0:
            raise ValueError("FusedDecoder.prefill starts from an empty cache")
        if seq > cache.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds the cache length of {cache.max_seq_len}")
        device = prompt_ids.device
        heads, kv_heads, head_dim, linear = self.n_heads, self.n_kv_heads, self.head_dim, self._linear
        if padding_mask is None:
            rows, mask = None, None  # every position of (batch * seq) is real
            positions = torch.arange(seq, device=device).repeat(batch)
            last = torch.arange(1, batch + 1, device=device) * seq - 1
            cache.key_mask[:, :seq] = True
            cache.n_real += seq
        else:
            # The model's rule (``Transformer.hidden_states``): positions count real tokens only;
            # a query sees the real keys up to itself, and a padding query sees itself.
            real = padding_mask.bool()
            rows = real.flatten().nonzero().squeeze(1)
            positions = (real.long().cumsum(-1) - 1).flatten()[rows]
            last = real.sum(-1).cumsum(0) - 1  # each row's last real token, among the real ones
            causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
            mask = ((causal & real[:, None, :]) | torch.eye(seq, dtype=torch.bool, device=device))[:, None]
            cache.key_mask[:, :seq] = real
            cache.n_real += real.sum(-1)
            cache.has_padding = True
        rotation = self.freqs_cis[positions][:, None, :] * self.rotation_scale  # (tokens, heads + kv, hd/2)
        ids = prompt_ids.flatten()
        x = F.embedding(ids if rows is None else ids[rows], self.embeddings)  # (tokens, dim)
        for layer_id, (wqkv, wo, w13, w2) in enumerate(self.layers):
            qk, v = linear(self._normalize(x), wqkv).split(self.qk_v, 1)
            qk = torch.view_as_complex(qk.float().view(-1, heads + kv_heads, head_dim // 2, 2))
            qkv = torch.cat([torch.view_as_real(qk * rotation).flatten(1).to(x.dtype), v], 1)
            if rows is not None:  # into the padded layout, zeros at padding
                qkv = qkv.new_zeros(batch * seq, qkv.shape[1]).index_copy_(0, rows, qkv)
            q, k, v = qkv.view(batch, seq, heads + 2 * kv_heads, head_dim).transpose(1, 2).split(
                [heads, kv_heads, kv_heads], 1)
            cache.keys[layer_id, :, :, :seq] = k
            cache.values[layer_id, :, :, :seq] = v
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0,
                                                      enable_gqa=heads != kv_heads)
            attended = attended.transpose(1, 2).reshape(batch * seq, self.q_size)
            x = x + linear(attended if rows is None else attended[rows], wo)
            gate, up = linear(self._normalize(x), w13).chunk(2, 1)
            x = x + linear(F.silu(gate) * up, w2)
        cache.length += seq
        return self._logits(x[last])

    def _logits(self, x: Tensor) -> Tensor:
        return self._linear(self._normalize(x), self.output).float()


def _onednn_linear(x: Tensor, packed_weight: Tensor) -> Tensor:
    """``x @ W^T`` with ``W`` prepacked by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise.default(x, packed_weight, None, "none", [], "")


_kept: weakref.WeakKeyDictionary[Transformer, tuple[tuple, FusedDecoder]] = weakref.WeakKeyDictionary()


def fused_decoder(model: Transformer) -> FusedDecoder:
    """The ``FusedDecoder`` of ``model``: the one kept from the last call if no parameter has
    changed since, else a new one (kept if its weights take at most ``KEPT_BYTES``).

    A change is any in-place update of a parameter (an optimizer step, ``load_state_dict``, a
    ``copy_`` under ``no_grad``: each bumps the tensor's version counter) or a new tensor in its
    place (``.to(dtype)``, ``load_state_dict(assign=True)``). Only one model's decoder is kept,
    and it is dropped with the model.
    """
    signature = tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())
    kept = _kept.get(model)
    if kept is not None and kept[0] == signature:
        return kept[1]
    _kept.clear()  # free the old copy before building the new one
    decoder = FusedDecoder(model)
    if sum(p.numel() * p.element_size() for p in model.parameters()) <= KEPT_BYTES:
        _kept[model] = (signature, decoder)
    return decoder


def _plain_name(name: str) -> str:
    """A parameter's name in ``model.py`` terms: wrappers insert private path components
    (activation checkpointing's ``_checkpoint_wrapped_module``, ``torch.compile``'s ``_orig_mod``)."""
    return ".".join(part for part in name.split(".") if not part.startswith("_"))
