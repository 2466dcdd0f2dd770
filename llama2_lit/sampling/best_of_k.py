"""Best-of-K: can a reward model pick the policy's good samples? (paper section 3.2.3, Fig 7)

Rejection sampling keeps, of K samples per prompt, the one the reward model scores best; it only
helps if the reward model ranks the policy's own samples the way the true judge would. Here the
toy world's oracle is the true judge, so for held-out prompts we draw K samples from the policy
and compare the oracle's score of the sample picked

* by the **helpfulness RM** (highest R_h),
* by the **safety-aware reward** R_c of section 3.2.3 (R_s on a safety-tagged prompt or when
  R_s < 0.15, else R_h; ``llama2_lit.rlhf.rewards.safety_first_reward``),
* **at random** (the expectation of a uniform pick: the mean over the K samples),
* by the **oracle** itself (the ceiling: the best of K),

for K = 1, 2, 4, 8, 16 (each averaged over every K-subset of the same 16 samples). The oracle's
score is its ``helpfulness`` (0 for an unsafe reply; for a harmful request it rewards the
best-practice refusal); the share of unsafe picks is reported too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llama2_lit.data.oracle import judge
from llama2_lit.model import Transformer
from llama2_lit.reward_metrics import score_responses
from llama2_lit.rlhf.best_of_k import expected_order_statistic
from llama2_lit.sampling.annotate import sample_responses

KS = (1, 2, 4, 8, 16)


@dataclass
class BestOfK:
    """Samples, scores and the oracle score of each selector's pick for each K."""

    ks: tuple[int, ...]
    responses: list[list[str]]
    """(prompts, K) sampled responses."""
    oracle: Tensor
    """(prompts, K) oracle helpfulness of each sample."""
    unsafe: Tensor
    """(prompts, K) bool: the sample is unsafe."""
    helpfulness: Tensor
    """(prompts, K) helpfulness-RM score of each sample, sigmoid scale."""
    safety: Tensor | None
    """(prompts, K) safety-RM score, sigmoid scale (None without a safety RM)."""
    is_safety: Tensor
    """(prompts,) bool: the prompt is safety-tagged."""

    def rankings(self) -> dict[str, Tensor]:
        """What each selector ranks a prompt's samples by, (prompts, K)."""
        out = {"helpfulness_rm": self.helpfulness, "oracle": self.oracle}
        if self.safety is not None:
            from llama2_lit.rlhf.rewards import safety_first_reward

            out["safety_aware_rm"] = safety_first_reward(self.helpfulness, self.safety,
                                                         self.is_safety[:, None].expand_as(self.helpfulness))
        return out

    def table(self, values: Tensor | None = None) -> dict[str, dict[int, float]]:
        """Mean oracle score (or ``values``) of each selector's best-of-k pick, by k.

        Each entry averages over every k-subset of the K samples (``rlhf.best_of_k``: unbiased and
        far less noisy than the first k samples alone); ``random`` is a uniform pick.
        """
        values = self.oracle if values is None else values
        rows: dict[str, dict[int, float]] = {"random": {k: float(values.float().mean()) for k in self.ks}}
        for name, ranking in self.rankings().items():
            rows[name] = {k: float(expected_order_statistic(values, k, k, order_by=ranking).mean()) for k in self.ks}
        return rows

    def unsafe_table(self) -> dict[str, dict[int, float]]:
        """Share of unsafe picks of each selector, by k."""
        return self.table(self.unsafe.float())


def best_of_k(policy: Transformer, tokenizer: Any, prompt_records: Sequence[dict[str, Any]],
              helpfulness_rm: Transformer, safety_rm: Transformer | None = None, *, ks: Sequence[int] = KS,
              temperature: float = 0.6, top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 64,
              seed: int = 0) -> BestOfK:
    """Draw ``max(ks)`` samples per prompt from ``policy`` and score them with the oracle and the RMs."""
    ks = tuple(sorted(ks))
    k_max = ks[-1]
    prompts = [r["messages"] for r in prompt_records]
    repeated = [p for p in prompts for _ in range(k_max)]  # prompt-major: sample j of prompt i at i*K + j
    flat = sample_responses(policy, tokenizer, repeated, temperature=temperature, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, top_p=top_p, seed=seed)
    responses = [flat[i * k_max:(i + 1) * k_max] for i in range(len(prompts))]
    judgements = [judge(prompts[i], text, prompt_records[i].get("meta")) for i in range(len(prompts))
                  for text in responses[i]]
    shape = (len(prompts), k_max)
    oracle = torch.tensor([j.helpfulness for j in judgements]).view(shape)
    unsafe = torch.tensor([not j.safe for j in judgements]).view(shape)
    # An empty sample still gets a score (the RM reads the bare EOS), as rejection sampling would see it.
    helpfulness = torch.sigmoid(score_responses(helpfulness_rm, tokenizer, repeated, flat,
                                                batch_size=batch_size)).view(shape)
    safety = None
    if safety_rm is not None:
        safety = torch.sigmoid(score_responses(safety_rm, tokenizer, repeated, flat, batch_size=batch_size)).view(shape)
    is_safety = torch.tensor([bool(r.get("is_safety")) for r in prompt_records])
    return BestOfK(ks, responses, oracle, unsafe, helpfulness, safety, is_safety)


def random_prompts(records: Sequence[dict[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` records drawn without replacement with ``seed`` (all of them when there are fewer)."""
    records = list(records)
    return records if n >= len(records) else random.Random(seed).sample(records, n)


def format_table(rows: dict[str, dict[int, float]]) -> str:
    """A plain-text table: one row per selector, one column per K."""
    ks = sorted(next(iter(rows.values())))
    lines = [f"{'pick by':<16}" + "".join(f"{f'K={k}':>8}" for k in ks)]
    lines += [f"{name:<16}" + "".join(f"{values[k]:>8.3f}" for k in ks) for name, values in rows.items()]
    return "\n".join(lines)
