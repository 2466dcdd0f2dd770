"""Generation's forward passes (prefill and single-token steps), rebuilt for speed at inference time.

A decoding step of a small model is not limited by its matmuls' arithmetic but by the number of
operators it dispatches and by how fast each matmul reads its weights: the micro model's step
through ``Transformer.hidden_states`` is ~35 operators per layer around 7 one-row matmuls.
``FusedDecoder`` computes the same function with the weights rearranged once, when generation
starts, from the model's own (Meta-named) parameters, which it leaves untouched:

* **Fused matmuls.** ``wq``, ``wk`` and ``wv`` are one ``(q + k + v, dim)`` matrix and ``w1``,
  ``w3`` one ``(2 * hidden, dim)`` matrix (the fusion inference engines make), so a layer runs 4
  matmuls instead of 7. Each RMSNorm's weight is folded into the columns of the matrix that
  reads the norm (``(x * r * g) @ W^T == (x * r) @ (W * g)^T``; not under autocast, see below),
  and the norm itself is three vectorised operators instead of torch's composite ``rms_norm`` (~8).
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
steps of the micro model), and only for models whose copy is small.

**Under the CPU's bf16 autocast** (Lightning's ``bf16-mixed``: PPO, Ghost Attention and context
distillation generate inside such a trainer) the decoder computes the model's autocast path
(``ambient_matmul_dtype``): its blocks' matrices are bf16 copies of the fp32 weights (prepacked
in bf16 for oneDNN), their inputs are cast to bf16 and their outputs are bf16, while the residual
stream, RMSNorm, RoPE, attention, softmax and the LM head stay fp32, as ``Transformer.logits``
keeps the head. It rounds to bf16 where autocast rounds: each RMSNorm's output, weight included
(so those weights are applied in fp32, not folded into bf16 matrices), and the queries and keys
after RoPE (``apply_rotary_emb`` returns its input's dtype); the attention scale is applied after
that rounding. Its own calls run with autocast off, so each operator computes in the dtype chosen
here. Measured against the model's autocast path, the logits agree to fp32 precision (1e-6)
until an fp32 reordering lands on a bf16 rounding's midpoint and flips one digit; the cache keeps
that difference (<= 0.5% of the largest logit; about half the rows of a random-init micro model
carry one after 16 steps), so greedy tokens differ only at near-ties (top-2 logit gaps < 1e-3,
the median gap being 0.05). The micro model generates ~2.7x (batch 1) and ~1.8x (batch 16)
faster than through its modules (``benchmarks/generation.py --dtypes bf16-mixed``).
``fused_decoder`` keeps a decoder per matmul dtype, so an fp32 call after a bf16-autocast one
uses its own.

Where the model must run as a module, ``FusedDecoder.supports`` says no and ``generate`` keeps the
model's own path: FSDP-sharded models (their forward runs the all-gathers of FSDP's hooks) and
calls under any other autocast (fp16, or on an accelerator: not measured here).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

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
    ``matmul_dtype``: the dtype of the blocks' matmuls, the weights' by default; bf16 on fp32
    weights computes the model under bf16 autocast (see the module docstring), whether or not the
    call is made under autocast.
    """

    def __init__(self, model: Transformer, *, prepack: bool | None = None,
                 matmul_dtype: torch.dtype | None = None) -> None:
        config = model.config
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.hidden_dim = config.hidden_dim
        self.qk_v, self.q_k = [self.q_size + self.kv_size, self.kv_size], [config.n_heads, config.n_kv_heads]
        params = {_plain_name(name): p.detach() for name, p in model.named_parameters()}
        self.embeddings = params["tok_embeddings.weight"]
        device, weight_dtype = self.embeddings.device, self.embeddings.dtype
        self.matmul_dtype = weight_dtype if matmul_dtype is None else matmul_dtype
        if self.matmul_dtype != weight_dtype and (weight_dtype, self.matmul_dtype) != (torch.float32, torch.bfloat16):
            raise ValueError(f"blocks' matmuls in {self.matmul_dtype} on {weight_dtype} weights: only bf16 on fp32 "
                             "weights (bf16 autocast's mixed precision) is computed")
        if prepack and not onednn_linear_available(device):
            raise ValueError(f"oneDNN's prepacked linear is not available on {device}")
        self.packed_rows = PACKED_ROWS if (onednn_linear_available(device) if prepack is None else prepack) else None
        self._linear = _onednn_linear if self.packed_rows else F.linear
        # Mixed precision (bf16 matmuls on fp32 weights, autocast's) rounds what the model's
        # autocast path rounds, where it does: the RMSNorms' outputs, weight included (so their
        # weights are not folded into the bf16 matrices but applied in fp32), and the queries and
        # keys after RoPE (the model's ``apply_rotary_emb`` returns its input's dtype).
        self.mixed = self.matmul_dtype != weight_dtype
        # Elsewhere each RMSNorm's weight is folded into the matrix that reads the norm (``_matrix``).
        self.eps_tensor = torch.tensor(config.norm_eps, device=device)
        self.layers = []  # (wqkv, wo, w13, w2) per block
        self.norm_weights = []  # (attention_norm, ffn_norm) per block, when mixed; else (None, None)
        for i in range(config.n_layers):
            p = {name.removeprefix(f"layers.{i}."): t for name, t in params.items() if name.startswith(f"layers.{i}.")}
            attention_norm, ffn_norm = p["attention_norm.weight"].float(), p["ffn_norm.weight"].float()
            self.norm_weights.append((attention_norm, ffn_norm) if self.mixed else (None, None))
            self.layers.append((
                self._matrix(p["attention.wq.weight"], p["attention.wk.weight"], p["attention.wv.weight"],
                             norm=None if self.mixed else attention_norm, dtype=self.matmul_dtype),
                self._matrix(p["attention.wo.weight"], dtype=self.matmul_dtype),
                self._matrix(p["feed_forward.w1.weight"], p["feed_forward.w3.weight"],
                             norm=None if self.mixed else ffn_norm, dtype=self.matmul_dtype),
                self._matrix(p["feed_forward.w2.weight"], dtype=self.matmul_dtype),
            ))
        # The LM head stays in the weights' dtype: under autocast the model's head runs in fp32
        # (``Transformer.logits``), so the logits carry no bf16 rounding.
        self.output = self._matrix(params["output.weight"], norm=params["norm.weight"], dtype=weight_dtype)
        self.output_dtype = weight_dtype
        self.freqs_cis = model.freqs_cis(device)
        # The attention scale, folded into the queries' rows of the rotation (the keys' stay 1);
        # when mixed, applied after that rounding instead (``query_scale``: a 1-element fp32
        # tensor, so ``bf16 * query_scale`` is one fp32 operator), as the model's attention does.
        scale = 1.0 / math.sqrt(self.head_dim)
        self.rotation_scale = torch.ones(self.n_heads + self.n_kv_heads, 1, device=device)
        if not self.mixed:
            self.rotation_scale[:self.n_heads] = scale
        self.query_scale = torch.tensor([scale], device=device)

    @staticmethod
    def supports(model: Transformer) -> bool:
        """Whether ``FusedDecoder`` computes ``model``'s generation (else use the model's own path):
        a model with an LM head, not FSDP-sharded, called without autocast or under the CPU's
        bf16 autocast (``ambient_matmul_dtype``)."""
        parameter = next(model.parameters())
        if model.output is None or hasattr(parameter, "to_local"):  # FSDP2 DTensors
            return False
        return ambient_matmul_dtype(parameter) is not None

    # ------------------------------------------------------------------------------ weights
    def _matrix(self, *weights: Tensor, norm: Tensor | None = None, dtype: torch.dtype) -> Tensor:
        """``weights`` stacked along the output dimension, times the weight of the RMSNorm that
        feeds them (``(x * r * g) @ W^T == (x * r) @ (W * g)^T``; the product in fp32, rounded
        once to ``dtype``), prepacked for oneDNN where it is used."""
        weight = torch.cat(weights) if len(weights) > 1 else weights[0].contiguous()
        if norm is not None:
            weight = weight.float() * norm.float()
        weight = weight.to(dtype)
        if self.packed_rows is None:
            return weight
        # Private operators: the oneDNN linear that torch.compile's CPU backend (inductor) emits
        # for frozen linear layers; torch is pinned, and ``onednn_linear_available`` guards them.
        return torch.ops.mkldnn._reorder_linear_weight(weight, self.packed_rows)

    def _normalize(self, x: Tensor, dtype: torch.dtype, weight: Tensor | None = None) -> Tensor:
        """RMSNorm of ``x`` (rows, dim): ``x * rsqrt(mean(x^2) + eps)``, in three vectorised
        operators instead of torch's composite rms_norm (~8), with ``mean(x^2) = |x|^2 / dim``;
        times ``weight`` (None: folded into the next matrix); in fp32 (as Meta's RMSNorm), cast
        to ``dtype``, the dtype of the matrix that reads it."""
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        normed = x * torch.addcmul(self.eps_tensor, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
        if weight is not None:
            normed = normed * weight
        return normed if dtype == torch.float32 else normed.to(dtype)

    # ------------------------------------------------------------------------------ forward
    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Logits (batch, vocab) after one new real token per row (``tokens``, shape (batch,))."""
        if torch.is_autocast_enabled(tokens.device.type):  # the dtypes are the decoder's own (see _step)
            with torch.autocast(tokens.device.type, enabled=False):
                return self._step(tokens, cache)
        return self._step(tokens, cache)

    def prefill(self, prompt_ids: Tensor, cache: KVCache, padding_mask: Tensor | None = None) -> Tensor:
        """Logits (batch, vocab) at the last real token of each row of ``prompt_ids`` (batch, seq),
        written into an empty ``cache``. ``padding_mask`` (batch, seq): 1 on real tokens; None:
        every token is real.

        The blocks run on the real tokens only (a left-padded batch of ragged prompts is up to
        half padding); attention reads them in the padded layout, where padding holds zeros,
        is masked, and stays masked in the cache.
        """
        if torch.is_autocast_enabled(prompt_ids.device.type):
            with torch.autocast(prompt_ids.device.type, enabled=False):
                return self._prefill(prompt_ids, cache, padding_mask)
        return self._prefill(prompt_ids, cache, padding_mask)

    # Both run with autocast off: every operator computes in the dtype chosen here (the residual
    # stream in the weights' dtype, the blocks' matmuls in ``matmul_dtype``), whatever the caller's
    # context; under autocast, its casts would move the attention's matmuls to bf16 and the head too.
    def _step(self, tokens: Tensor, cache: KVCache) -> Tensor:
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
        # No casts to dispatch where the dtypes already agree (each operator counts here).
        matmul_dtype = self.matmul_dtype
        fp32_matmuls, fp32_cache, mixed = matmul_dtype == torch.float32, cache.keys.dtype == torch.float32, self.mixed
        for layer_id, ((wqkv, wo, w13, w2), (attention_norm, ffn_norm)) in enumerate(zip(self.layers,
                                                                                          self.norm_weights)):
            qk, v = linear(self._normalize(x, matmul_dtype, attention_norm), wqkv).split(self.qk_v, 1)
            # Queries and keys rotated together, in fp32 (Meta's apply_rotary_emb); the cache
            # write casts the keys to the cache's dtype.
            qk = qk.view(batch, heads + kv_heads, head_dim // 2, 2)
            qk = torch.view_as_real(torch.view_as_complex(qk if fp32_matmuls else qk.float()) * rotation)
            if mixed:  # rounded where the model's autocast path rounds (module docstring)
                qk = qk.to(matmul_dtype)
            q, k = qk.view(batch, heads + kv_heads, head_dim).split(self.q_k, 1)
            key_slots[layer_id].copy_(k)
            value_slots[layer_id].copy_(v.view(batch, kv_heads, head_dim))
            # The query heads of each KV head are its query rows: (batch, kv_heads, rep, keys).
            # Attention is computed in fp32: the CPU's bf16 batched matmul copies its operands
            # and is slower than converting them.
            keys, vals = (keys_t[layer_id], values[layer_id]) if fp32_cache else \
                (keys_t[layer_id].float(), values[layer_id].float())
            q = q.view(batch, kv_heads, heads // kv_heads, head_dim)
            scores = (q * self.query_scale if mixed else q) @ keys
            if bias is not None:
                scores = scores + bias
            attended = (scores.softmax(-1) @ vals).view(batch, self.q_size)
            # The residual stream stays in the weights' dtype (fp32 + bf16 is fp32, as under autocast).
            x = x + linear(attended if fp32_matmuls else attended.to(matmul_dtype), wo)
            gate, up = linear(self._normalize(x, matmul_dtype, ffn_norm), w13).chunk(2, 1)
            x = x + linear(F.silu(gate) * up, w2)
        cache.n_real += 1
        cache.length += 1
        return self._logits(x)

    def _prefill(self, prompt_ids: Tensor, cache: KVCache, padding_mask: Tensor | None) -> Tensor:
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
        matmul_dtype = self.matmul_dtype
        for layer_id, ((wqkv, wo, w13, w2), (attention_norm, ffn_norm)) in enumerate(zip(self.layers,
                                                                                          self.norm_weights)):
            qk, v = linear(self._normalize(x, matmul_dtype, attention_norm), wqkv).split(self.qk_v, 1)
            qk = torch.view_as_complex(qk.float().view(-1, heads + kv_heads, head_dim // 2, 2))
            # Queries and keys rounded to the matmuls' dtype after RoPE (the model's apply_rotary_emb),
            # attention in the residual stream's: fp32 under autocast, as the model's
            # (``Attention.forward`` runs the CPU's SDPA in fp32 there).
            qkv = torch.cat([torch.view_as_real(qk * rotation).flatten(1).to(matmul_dtype), v], 1).to(x.dtype)
            if rows is not None:  # into the padded layout, zeros at padding
                qkv = qkv.new_zeros(batch * seq, qkv.shape[1]).index_copy_(0, rows, qkv)
            q, k, v = qkv.view(batch, seq, heads + 2 * kv_heads, head_dim).transpose(1, 2).split(
                [heads, kv_heads, kv_heads], 1)
            cache.keys[layer_id, :, :, :seq] = k
            cache.values[layer_id, :, :, :seq] = v
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                      scale=None if self.mixed else 1.0, enable_gqa=heads != kv_heads)
            attended = attended.transpose(1, 2).reshape(batch * seq, self.q_size)
            attended = attended if rows is None else attended[rows]
            x = x + linear(attended.to(matmul_dtype), wo)
            gate, up = linear(self._normalize(x, matmul_dtype, ffn_norm), w13).chunk(2, 1)
            x = x + linear(F.silu(gate) * up, w2)
        cache.length += seq
        return self._logits(x[last])

    def _logits(self, x: Tensor) -> Tensor:
        return self._linear(self._normalize(x, self.output_dtype), self.output).float()


def _onednn_linear(x: Tensor, packed_weight: Tensor) -> Tensor:
    """``x @ W^T`` with ``W`` prepacked by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise.default(x, packed_weight, None, "none", [], "")


def ambient_matmul_dtype(parameter: Tensor) -> torch.dtype | None:
    """The dtype of the blocks' matmuls in a generation call made now, for a model with
    parameters like ``parameter``: the weights' dtype without autocast on their device, bf16
    under the CPU's bf16 autocast (Lightning's ``bf16-mixed``); None under any other autocast
    (the decoder does not compute those: ``FusedDecoder.supports`` says no)."""
    device_type = parameter.device.type
    if not torch.is_autocast_enabled(device_type):
        return parameter.dtype
    if device_type == "cpu" and torch.get_autocast_dtype("cpu") == torch.bfloat16 and \
            parameter.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16
    return None


# The kept decoders of one model: its parameters' signature and a decoder per matmul dtype.
_kept: weakref.WeakKeyDictionary[Transformer, tuple[tuple, dict[torch.dtype, FusedDecoder]]] = \
    weakref.WeakKeyDictionary()

# Optimizer steps taken in this process, by any optimizer. A fused optimizer (``AdamW(fused=True)``,
# what the stages use) writes the parameters in one kernel that bumps no version counter, so the
# versions alone would keep serving the weights of before the step.
_optimizer_steps = 0


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def fused_decoder(model: Transformer, matmul_dtype: torch.dtype | None = None) -> FusedDecoder:
    """The ``FusedDecoder`` of ``model`` with its blocks' matmuls in ``matmul_dtype`` (default:
    ``ambient_matmul_dtype``, so under bf16 autocast it is the bf16 one): the one kept from an
    earlier call if no parameter has changed since, else a new one (kept if the model's weights
    take at most ``KEPT_BYTES``).

    A change is any optimizer step in the process (counted by a global step hook: a fused
    optimizer bumps no version counter), any other in-place update of a parameter
    (``load_state_dict``, a ``copy_`` under ``no_grad``: each bumps the tensor's version counter)
    or a new tensor in its place (``.to(dtype)``, ``load_state_dict(assign=True)``). One decoder
    per matmul dtype is kept (an fp32 evaluation between bf16-autocast rollouts of the same
    weights rebuilds neither), for one model only, and they are dropped with the model.
    """
    if matmul_dtype is None:
        parameter = next(model.parameters())
        matmul_dtype = ambient_matmul_dtype(parameter) or parameter.dtype
    signature = (_optimizer_steps, *((id(p), p.data_ptr(), p._version) for p in model.parameters()))
    kept = _kept.get(model)
    if kept is not None and kept[0] == signature:
        if matmul_dtype in kept[1]:
            return kept[1][matmul_dtype]
    else:
        _kept.clear()  # free the old copies before building the new one
        kept = None
    decoder = FusedDecoder(model, matmul_dtype=matmul_dtype)
    if sum(p.numel() * p.element_size() for p in model.parameters()) <= KEPT_BYTES:
        if kept is None:
            kept = _kept[model] = (signature, {})
        kept[1][matmul_dtype] = decoder
    return decoder


def _plain_name(name: str) -> str:
    """A parameter's name in ``model.py`` terms: wrappers insert private path components
    (activation checkpointing's ``_checkpoint_wrapped_module``, ``torch.compile``'s ``_orig_mod``)."""
    return ".".join(part for part in name.split(".") if not part.startswith("_"))
