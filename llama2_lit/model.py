"""The Llama 2 model core: one file, no parallelism code.

Every stage of the recipe runs on this module: pretraining and SFT use the language-model head,
reward and value models use the scalar head (paper section 3.2.2: "the classification head for
next-token prediction is replaced with a regression head for outputting a scalar reward").

Architecture (paper section 2.2 and Meta's ``llama/model.py``):
pre-norm residual blocks ``h = x + Attention(RMSNorm(x)); out = h + FeedForward(RMSNorm(h))``,
RMSNorm computed in fp32, rotary position embeddings on queries and keys, grouped-query attention
(paper A.2.1), a SwiGLU feed-forward, a final RMSNorm and an untied output projection. No biases,
no dropout.

Parameter names are Meta's (``tok_embeddings``, ``layers.{i}.attention.wq``, ``feed_forward.w1``,
``attention_norm``, ``ffn_norm``, ``norm``, ``output``), so our state dict *is* a Meta consolidated
checkpoint. RoPE uses Meta's convention: dimensions ``(2i, 2i+1)`` of each head form a rotating
pair (a complex number). Hugging Face rotates the pairs ``(i, i + head_dim/2)`` instead, and
permutes the rows of ``wq``/``wk`` to match; ``llama2_lit.checkpoints`` converts at that boundary.

Sharding (FSDP), activation checkpointing and mixed precision are applied from outside by
``llama2_lit.parallelize``; this file only describes the math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama2_lit.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32 as Meta does."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the same numbers without two no-op casts (decoding counts ops)
            return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def precompute_freqs_cis(head_dim: int, max_seq_len: int, theta: float = 10000.0,
                         device: torch.device | None = None) -> Tensor:
    """RoPE rotations ``exp(i * t * theta^(-2j/head_dim))`` as complex64, shape (max_seq_len, head_dim/2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), freqs)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate pairs ``(x[2j], x[2j+1])`` of each head by ``freqs_cis`` (Meta's convention).

    x: (batch, seq, heads, head_dim); freqs_cis: (batch or 1, seq, 1, head_dim/2) complex.
    Computed in fp32 and cast back, as Meta does.
    """
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex ops; the same product in real arithmetic fuses.
        x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = freqs_cis.real, freqs_cis.imag
        rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
        return rotated.flatten(-2).type_as(x)
    if x.dtype != torch.float32:
        return apply_rotary_emb(x.float(), freqs_cis).type_as(x)
    x_complex = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(x_complex * freqs_cis).flatten(-2)


class KVCache:
    """Preallocated keys and values for incremental decoding (Meta's ``llama/model.py`` preallocates its cache too).

    Layout per layer is (batch, n_kv_heads, max_seq_len, head_dim), the layout attention reads.
    The cache also remembers which slots hold real tokens (``key_mask``: left padding stays
    masked forever) and how many real tokens each row has seen (``n_real``), which is the next
    position id of that row. ``length`` is the number of slots filled, the same for every row.
    ``has_padding`` says whether any slot was written with a padding mask; while it is False,
    single-token decoding needs no attention mask at all (the query sees every filled slot).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        max_seq_len = max_seq_len or config.max_seq_len
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_seq_len, device=device, dtype=torch.bool)
        self.n_real = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[3]

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences from a decoding batch)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]
        self.key_mask = self.key_mask[rows]
        self.n_real = self.n_real[rows]


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads and RoPE (paper 2.2, A.2.1)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, layer_id: int = 0) -> Tensor:
        batch, seq, _ = x.shape
        q = apply_rotary_emb(self.wq(x).view(batch, seq, self.n_heads, self.head_dim), freqs_cis)
        k = apply_rotary_emb(self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            start, end = cache.length, cache.length + seq
            keys, values = cache.keys[layer_id], cache.values[layer_id]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            k, v = keys[:, :, :end], values[:, :, :end]
        # Query head h reads KV head h // n_rep (Meta's repeat_kv == SDPA's enable_gqa). Without a
        # mask, several queries are causal; a single one (a decoding step) sees every key.
        options = dict(attn_mask=mask, is_causal=mask is None and seq > 1, enable_gqa=self.n_heads != self.n_kv_heads)
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # Under CPU bf16 autocast (bf16-mixed), attention runs in fp32: torch's CPU flash
            # attention is slower in bf16 than in fp32 (its forward and backward on the micro
            # training shape, AVX512-BF16), while the matmuls around it gain 4x from bf16.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **options)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, layer_id: int, config: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 2 with a language-model head, a scalar head, or both.

    Args:
        config: the shape.
        lm_head: build ``output`` (dim -> vocab), the next-token head.
        scalar_head: build ``score`` (dim -> 1), the regression head of reward and value models.
    """

    def __init__(self, config: ModelConfig, *, lm_head: bool = True, scalar_head: bool = False) -> None:
        super().__init__()
        if not (lm_head or scalar_head):
            raise ValueError("a Transformer needs at least one head (lm_head or scalar_head)")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False) if lm_head else None
        self.score = nn.Linear(config.dim, 1, bias=False) if scalar_head else None
        # RoPE tables are derived data, not state: kept out of the state dict and out of
        # ``Module.to(dtype)`` (a bf16 cast would destroy them), and built once per device.
        self._freqs_cis: dict[torch.device, Tensor] = {}
        self.reset_parameters()

    # ------------------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation for pretraining from scratch (Meta's code loads weights and has none).

        All matrices ~ N(0, init_std) (0.02, as GPT-2/HF); the two projections that write into the
        residual stream (``wo``, ``w2``) are scaled by 1/sqrt(2 * n_layers), as in GPT-2, so the
        residual stream's variance does not grow with depth; norms start at 1. A fresh scalar head
        starts at N(0, 1/sqrt(dim + 1)) so initial rewards are O(1) (the "N+ implementation
        details" of RLHF). Safe to call after ``to_empty`` on a meta-device model.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            for linear in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                           layer.feed_forward.w1, layer.feed_forward.w3):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(layer.attention.wo.weight, std=residual_std)
            nn.init.normal_(layer.feed_forward.w2.weight, std=residual_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)
        if self.score is not None:
            self.reset_score_head()

    @torch.no_grad()
    def reset_score_head(self) -> None:
        """A fresh scalar head: N(0, 1/sqrt(dim + 1)), so initial rewards are O(1). Also used when a
        reward model starts from an SFT checkpoint, which has no ``score`` (paper section 3.2.2)."""
        nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(self.config.dim + 1))

    # ------------------------------------------------------------------------------ forward
    def freqs_cis(self, device: torch.device) -> Tensor:
        if device not in self._freqs_cis:
            self._freqs_cis[device] = precompute_freqs_cis(
                self.config.head_dim, self.config.max_seq_len, self.config.rope_theta, device=device
            )
        return self._freqs_cis[device]

    def hidden_states(self, tokens: Tensor, *, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Final-normed hidden states, shape (batch, seq, dim).

        Args:
            tokens: (batch, seq) token ids.
            attention_mask: either a padding mask (batch, seq), 1/True for real tokens, which works
                for left- and right-padded batches; or a full boolean mask (batch, seq, keys) /
                (batch, 1, seq, keys), True where a query may attend a key (e.g. block-diagonal
                masks for packed documents). None means plain causal attention over all tokens
                (right padding needs no mask: causal attention never looks right).
            position_ids: (batch, seq) RoPE positions. Default: counted over real tokens only, so
                a left-padded row starts at position 0 like the same row unpadded.
            cache: a ``KVCache`` for incremental decoding; the new tokens are appended after the
                ``cache.length`` slots already filled.
        """
        batch, seq = tokens.shape
        past = 0 if cache is None else cache.length
        limit = self.config.max_seq_len if cache is None else min(cache.max_seq_len, self.config.max_seq_len)
        if past + seq > limit:
            raise ValueError(f"sequence of {past + seq} tokens exceeds the context length of {limit}")
        if cache is not None and seq == 1 and attention_mask is None and position_ids is None:
            return self._decode_step(tokens, cache)
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            position_ids = self._default_positions(batch, seq, padding_mask, cache, tokens.device)
        freqs = self.freqs_cis(tokens.device)
        if position_ids.dim() == 1:
            freqs = freqs[position_ids].unsqueeze(0).unsqueeze(2)
        else:
            freqs = freqs[position_ids].unsqueeze(2)
        mask = self._attention_mask(batch, seq, attention_mask, cache, tokens.device)
        if cache is not None and attention_mask is not None:
            cache.has_padding = True
        if cache is not None and padding_mask is not None:
            cache.n_real += padding_mask.sum(-1).to(torch.long)
        elif cache is not None:
            cache.n_real += seq

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs, mask, cache)
        if cache is not None:
            cache.length += seq
        return self.norm(h)

    def _decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """``hidden_states`` of one new real token per row after ``cache``: the same numbers as the
        general path, with the fewest operators (a decoding step is ~60 small kernels per layer,
        so their count, not the matmuls, sets the speed of small models)."""
        past = cache.length
        freqs = self.freqs_cis(tokens.device)[cache.n_real][:, None, None, :]  # each row's next position
        cache.key_mask[:, past] = True
        # Only padding needs a mask: the slots [0, past] are exactly the keys a new token may see.
        mask = cache.key_mask[:, None, None, :past + 1] if cache.has_padding else None
        cache.n_real += 1
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs, mask, cache)
        cache.length += 1
        return self.norm(h)

    def forward(self, tokens: Tensor, *, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Next-token logits (batch, seq, vocab) in fp32 (Meta returns ``output(h).float()``)."""
        if self.output is None:
            raise RuntimeError("this Transformer has no LM head (built with lm_head=False)")
        h = self.hidden_states(tokens, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        return self.logits(h)

    def logits(self, h: Tensor) -> Tensor:
        """The LM head on final-normed hidden states ``h`` (..., dim): fp32 logits (..., vocab)."""
        if torch.is_autocast_enabled(h.device.type) and self.output.weight.dtype == torch.float32:
            # Under mixed precision (fp32 weights, bf16 matmuls) the output projection stays in fp32,
            # so that the logits and the loss's gradient carry no bf16 rounding. Micro pretraining,
            # 600 steps, same seed: validation perplexity 2.575 with a bf16 head, 2.538 with this,
            # 2.444 in fp32 throughout. With bf16 weights (FSDP2's param_dtype) it runs in bf16.
            with torch.autocast(h.device.type, enabled=False):
                return self.output(h.float())
        return self.output(h).float()

    def scalar_outputs(self, tokens: Tensor, *, attention_mask: Tensor | None = None,
                       position_ids: Tensor | None = None) -> Tensor:
        """The scalar head at every position, (batch, seq), fp32: per-token values for PPO's critic."""
        if self.score is None:
            raise RuntimeError("this Transformer has no scalar head (built with scalar_head=False)")
        h = self.hidden_states(tokens, attention_mask=attention_mask, position_ids=position_ids)
        return self.score(h).squeeze(-1).float()

    def score_sequences(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """One scalar per sequence, read at its last real token (reward models), shape (batch,).

        ``attention_mask`` (batch, seq) marks real tokens; right and left padding both work.
        Without a mask every position is real and the last one is read.
        """
        if self.score is None:
            raise RuntimeError("this Transformer has no scalar head (built with scalar_head=False)")
        # Right padding only (every row's real tokens come first): causal attention never looks
        # right and positions count from 0 either way, so the real tokens need no mask (and keep
        # SDPA's fused causal kernel).
        right_padded = attention_mask is not None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
        h = self.hidden_states(tokens, attention_mask=None if right_padded else attention_mask)
        last = last_token_index(attention_mask) if attention_mask is not None else \
            torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        h_last = h[torch.arange(tokens.shape[0], device=tokens.device), last]
        return self.score(h_last).squeeze(-1).float()

    # ------------------------------------------------------------------------------ helpers
    def _default_positions(self, batch: int, seq: int, padding_mask: Tensor | None,
                           cache: KVCache | None, device: torch.device) -> Tensor:
        offset = cache.n_real[:, None] if cache is not None else 0
        if padding_mask is None:
            if cache is None:
                return torch.arange(seq, device=device)
            return offset + torch.arange(seq, device=device)
        counted = padding_mask.long().cumsum(-1) - 1
        return (offset + counted).clamp(min=0)

    def _attention_mask(self, batch: int, seq: int, attention_mask: Tensor | None,
                        cache: KVCache | None, device: torch.device) -> Tensor | None:
        """Boolean mask (batch, 1, seq, keys), True where attending is allowed; None = plain causal."""
        if attention_mask is not None and attention_mask.dim() > 2:
            mask = attention_mask.bool()
            return mask if mask.dim() == 4 else mask.unsqueeze(1)
        past = 0 if cache is None else cache.length
        if cache is None and attention_mask is None:
            return None  # SDPA's is_causal fast path
        if cache is not None:
            real = torch.ones(batch, seq, dtype=torch.bool, device=device) if attention_mask is None \
                else attention_mask.bool()
            cache.key_mask[:, past:past + seq] = real
            key_real = cache.key_mask[:, :past + seq]
        else:
            key_real = attention_mask.bool()
        keys = past + seq
        query_pos = torch.arange(past, keys, device=device)[:, None]
        key_pos = torch.arange(keys, device=device)[None, :]
        causal = key_pos <= query_pos
        # A padding query would see no key at all (softmax of nothing = NaN); let every query see
        # itself. Padding positions' outputs are garbage by definition and never read.
        return ((causal & key_real[:, None, :]) | (key_pos == query_pos)).unsqueeze(1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real (mask == 1) token of each row; works for left and right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(-1)
