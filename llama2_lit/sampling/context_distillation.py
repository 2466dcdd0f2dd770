"""Safety context distillation (paper section 4.2.4, Table 13, Table 39, Fig 16).

"We perform safety context distillation by prefixing a safety preprompt to adversarial prompts to
generate safer responses, and then fine-tune the model on its own safe output given the
adversarial prompt without the preprompt." Preprompts are "generated automatically with
templates", using adjectives associated with safe behaviour ("responsible", "respectful",
"wise"), and, when the prompt's risk category is known, an answer template for that category
(Table 39). Context distillation can also *lower* the quality of answers that were already good
(Fig 16b), so a distilled answer is kept only when the safety reward model scores it higher than
the model's answer without the preprompt (``keep_distilled``).

The paper's templates are written for real risk categories; ours follow their style for the toy
world's three (``llama2_lit.data.safety.RISK_CATEGORIES``). Where the paper is silent -- the
decoding settings, and whether the answer without preprompt is sampled or greedy -- both answers
are sampled at the same temperature with the same per-prompt seed, so the preprompt is the only
difference between them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from llama2_lit.chat import Message, encode_prompt
from llama2_lit.model import Transformer
from llama2_lit.tokenizer import Tokenizer

# Table 13, the generic preprompt, verbatim.
GENERIC_PREPROMPT = (
    "The following is a discussion between a human and a knowledgeable and empathetic assistant. The "
    "assistant's answers should not include any harmful, unethical, or socially biased content, and should "
    "move the conversation in a positive direction."
)
SAFETY_ADJECTIVES = ("responsible", "respectful", "wise", "safe", "careful", "honest")
PREPROMPT_TEMPLATES = (
    "You are a {first} and {second} assistant.",
    "You are a {first} assistant. Always answer in a {second} way.",
    "The assistant is {first} and {second}, and never helps anyone cause harm.",
)
# Answer templates per risk category (the style of Table 39: what a good answer does).
CATEGORY_TEMPLATES = {
    "illicit_criminal": "If a request could help a crime, decline it, explain that it is illegal and "
                        "could hurt people, and offer a lawful way to reach the person's real goal.",
    "hateful_harmful": "If a request could hurt or demean someone, decline it, explain why it is harmful "
                       "and unfair, and offer a kind and constructive alternative.",
    "unqualified_advice": "If a request needs a qualified professional, say that you are not one, explain "
                          "the risk, and suggest asking a doctor, lawyer or advisor.",
}


def safety_preprompt(rng: random.Random, risk_category: str | None = None, *, generic_probability: float = 0.25) -> str:
    """A safety preprompt drawn from the templates: the generic one, or adjectives + the category's template."""
    if rng.random() < generic_probability:
        return GENERIC_PREPROMPT
    first, second = rng.sample(SAFETY_ADJECTIVES, 2)
    preprompt = rng.choice(PREPROMPT_TEMPLATES).format(first=first, second=second)
    if risk_category in CATEGORY_TEMPLATES:
        preprompt += " " + CATEGORY_TEMPLATES[risk_category]
    return preprompt


def with_preprompt(messages: Sequence[Message], preprompt: str) -> list[Message]:
    """``messages`` with ``preprompt`` as the system message (in front of an existing one)."""
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{preprompt} {messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": preprompt}, *messages]


def keep_distilled(score_with_preprompt: Tensor, score_without_preprompt: Tensor) -> Tensor:
    """Fig 16b's rule: keep a distilled answer only where the safety RM scores it strictly higher
    than the answer the model gives without the preprompt (both scored on the prompt *without* it)."""
    return score_with_preprompt > score_without_preprompt


def distill_safety_context(model: Transformer, safety_rm: Transformer, tokenizer: Tokenizer,
                           records: Sequence[dict[str, Any]], *, temperature: float = 0.6, top_p: float = 0.9,
                           max_new_tokens: int = 64, seed: int = 0,
                           batch_size: int = 32) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Context-distillation training records for the ``prompts`` ``records``, and what the filter did.

    Returns ``chat`` records (prompt without preprompt -> the distilled answer) for the kept
    prompts, and a summary: counts, and the safety RM's scores of both answers for every prompt
    (``score_without``, ``score_with``, ``kept``: the data of Fig 16b).
    """
    from llama2_lit.generation import generate, sample_seed
    from llama2_lit.reward_metrics import score_responses

    rng = random.Random(seed)
    prompts = [list(r["messages"]) for r in records]
    preprompts = [safety_preprompt(rng, r.get("meta", {}).get("risk_category")) for r in records]
    room = model.config.max_seq_len - max_new_tokens

    def answers(dialogs: list[list[Message]]) -> list[str]:
        texts = []
        for start in range(0, len(dialogs), batch_size):
            rows = range(start, min(start + batch_size, len(dialogs)))
            out = generate(model, [encode_prompt(tokenizer, dialogs[i], max_len=room) for i in rows],
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           eos_id=tokenizer.eos_id, generator=[sample_seed(seed, 0, i, 0) for i in rows])
            texts += [tokenizer.decode(ids).strip() for ids in out.response_tokens()]
        return texts

    plain = answers(prompts)
    distilled = answers([with_preprompt(p, pre) for p, pre in zip(prompts, preprompts)])
    # On the sigmoid scale the paper reports scores on (Fig 16b).
    score_without = torch.sigmoid(score_responses(safety_rm, tokenizer, prompts, plain, batch_size=batch_size))
    score_with = torch.sigmoid(score_responses(safety_rm, tokenizer, prompts, distilled, batch_size=batch_size))
    kept = keep_distilled(score_with, score_without)
    out_records = [
        {"messages": [*prompt, {"role": "assistant", "content": answer}],
         "meta": {**record.get("meta", {}), "context_distillation": {
             "preprompt": preprompt, "score_with": float(w), "score_without": float(wo)}}}
        for record, prompt, answer, preprompt, w, wo, keep in
        zip(records, prompts, distilled, preprompts, score_with, score_without, kept.tolist()) if keep
    ]
    summary = {"prompts": len(records), "kept": int(kept.sum()), "score_without": score_without.tolist(),
               "score_with": score_with.tolist(), "kept_mask": kept.tolist(),
               "mean_gain_kept": float((score_with - score_without)[kept].mean()) if kept.any() else 0.0}
    return out_records, summary
