"""Attention probabilities of the model core, for looking at what the model reads.

The paper shows Ghost Attention's effect in one picture (section 3.3, Fig 10: the maximum
attention activations of a dialog with and without GAtt; with it, the system message keeps
drawing attention many turns later). The model core (``llama2_lit.model``) computes attention
with ``scaled_dot_product_attention`` and never materialises the probabilities; here they are
recomputed from each block's own ``wq``/``wk`` projections and RoPE, with forward pre-hooks that
read every ``Attention`` module's input during one ordinary forward pass. Nothing in the model
changes, and the recomputed probabilities reproduce the block's output exactly (tested).

``system_attention_by_turn`` reduces them to Fig 10's question: per layer and per assistant turn of
a dialog, the share of attention that the positions producing the reply pay to the system
message's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from llama2_lit.chat import B_INST, B_SYS, E_INST, E_SYS, Message, encode_dialog
from llama2_lit.model import Attention, Transformer, apply_rotary_emb
from llama2_lit.tokenizer import Tokenizer


def _probabilities(attention: Attention, x: Tensor, freqs_cis: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) of one ``Attention`` module for its input ``x``: (batch, heads, seq, keys)."""
    batch, seq, _ = x.shape
    q = apply_rotary_emb(attention.wq(x).view(batch, seq, attention.n_heads, attention.head_dim), freqs_cis)
    k = apply_rotary_emb(attention.wk(x).view(batch, seq, attention.n_kv_heads, attention.head_dim), freqs_cis)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    # Query head h reads key/value head h // n_rep (Meta's repeat_kv).
    k = k.repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attention.head_dim)
    if mask is None:
        mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


@torch.no_grad()
def attention_probabilities(model: Transformer, tokens: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
    """The attention probabilities of every layer for ``tokens`` (batch, seq), shape
    (layers, batch, heads, seq, keys): row ``[l, b, h, i]`` is how query position ``i`` of head ``h``
    in layer ``l`` distributes its attention over the keys (each row sums to 1; causal).

    One forward pass of ``model`` (the same positions and masks as ``model(tokens,
    attention_mask=...)``); a forward pre-hook on each ``Attention`` recomputes its probabilities.
    """
    captured: list[Tensor] = []

    def hook(module: Attention, args: tuple) -> None:
        x, freqs_cis, mask = args[0], args[1], args[2]
        captured.append(_probabilities(module, x, freqs_cis, mask))

    handles = [layer.attention.register_forward_pre_hook(hook) for layer in model.layers]
    try:
        model.hidden_states(tokens, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured)


def dialog_positions(tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int], list[list[int]]]:
    """Token positions in ``encode_dialog(tokenizer, messages)`` of a dialog that starts with a system
    message and ends with an assistant answer: (ids, the system message's positions, per assistant
    turn the positions of its answer tokens, EOS included).

    A token that straddles the system message's first or last byte counts as part of it.
    """
    if not messages or messages[0]["role"] != "system":
        raise ValueError("dialog_positions needs a dialog that starts with a system message")
    encoded = encode_dialog(tokenizer, messages)
    ids = encoded.ids
    # The first exchange is one sentencepiece call on this text (llama2_lit.chat; Meta's chat_completion).
    system, user, answer = messages[0]["content"], messages[1]["content"], messages[2]["content"]
    text = f"{B_INST} {(B_SYS + system + E_SYS + user).strip()} {E_INST} {answer.strip()} "
    first_ids, spans = tokenizer.encode_with_spans(text)
    if ids[1:1 + len(first_ids)] != first_ids:
        raise ValueError("the first exchange's tokens differ from encode_dialog's (a dialog cut to fit?)")
    start = len(f"{B_INST} {B_SYS}".encode())
    end = start + len(system.encode())
    system_positions = [1 + i for i, (b, e) in enumerate(spans) if e > start and b < end]
    turns: list[list[int]] = []
    previous = 0
    for position, flag in enumerate(encoded.loss_mask):
        if flag:
            if previous == 0:
                turns.append([])
            turns[-1].append(position)
        previous = flag
    return ids, system_positions, turns


@torch.no_grad()
def system_attention_by_turn(model: Transformer, tokenizer: Tokenizer, messages: Sequence[Message]) -> Tensor:
    """Per layer and assistant turn, shape (layers, turns): the mean over the positions that produce
    the turn's answer tokens (each answer token's preceding position, where the model predicts it)
    and over heads, of the attention probability mass on the system message's tokens."""
    ids, system, turns = dialog_positions(tokenizer, messages)
    if len(ids) > model.config.max_seq_len:
        raise ValueError(f"the dialog has {len(ids)} tokens, more than the model's context of "
                         f"{model.config.max_seq_len}")
    device = next(model.parameters()).device
    probabilities = attention_probabilities(model, torch.tensor([ids], device=device))[:, 0]  # (layers, heads, q, k)
    on_system = probabilities[..., system].sum(-1).mean(1)  # (layers, queries)
    return torch.stack([on_system[:, [p - 1 for p in positions]].mean(-1) for positions in turns], dim=1).cpu()
