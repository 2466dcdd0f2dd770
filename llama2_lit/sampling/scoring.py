"""Reward-model scores of (dialog, response) pairs, on the sigmoid scale the paper reports.

A reward model is a ``Transformer`` with a scalar head (paper section 3.2.2). It reads the whole
dialog -- the prompt with every earlier turn, then the response closed by EOS, exactly as the chat
format lays out a finished exchange -- and its score is the head's output at the last real token
(``Transformer.score_sequences``). Reported scores are ``sigmoid(raw)``: the paper's thresholds
(0.15 for the safety reward in section 3.2.3, 0.5 in Table 29) are on that scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llama2_lit.chat import Message, encode_dialog
from llama2_lit.model import Transformer
from llama2_lit.tokenizer import Tokenizer, pad_batch


def dialog_ids(tokenizer: Tokenizer, prompt: Sequence[Message], response: str, *, max_len: int) -> list[int]:
    """Token ids of ``prompt`` answered by ``response`` (earliest exchanges dropped to fit ``max_len``)."""
    return encode_dialog(tokenizer, [*prompt, {"role": "assistant", "content": response}], max_len=max_len).ids


@torch.inference_mode()
def reward_scores(reward_model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Sequence[Message]],
                  responses: Sequence[str], *, batch_size: int = 16) -> Tensor:
    """``sigmoid(r(prompt, response))`` per pair, shape (n,), float32 on CPU.

    Batches are right-padded; ``score_sequences`` reads each row at its own last real token, so
    the padding never changes a score.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(reward_model.parameters()).device
    max_len = reward_model.config.max_seq_len
    scores = []
    for start in range(0, len(prompts), batch_size):
        ids = [dialog_ids(tokenizer, p, r, max_len=max_len)
               for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
        tokens, mask = pad_batch(ids, side="right")
        raw = reward_model.score_sequences(tokens.to(device), mask.to(device))
        scores.append(torch.sigmoid(raw.float()).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
