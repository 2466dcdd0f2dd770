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

for K = 1, 2, 4, 8, 16 (the first K of the same samples, so the curves are nested). The oracle's
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

    def picks(self, k: int) -> dict[str, Tensor]:
        """Index (prompts,) of the sample each selector picks among the first ``k`` (random: None)."""
        out = {"helpfulness_rm": self.helpfulness[:, :k].argmax(1), "oracle": self.oracle[:, :k].argmax(1)}
        if self.safety is not None:
            from llama2_lit.rlhf.rewards import safety_first_reward

            combined = safety_first_reward(self.helpfulness[:, :k], self.safety[:, :k],
                                           self.is_safety[:, None].expand(-1, k))
            out["safety_aware_rm"] = combined.argmax(1)
        return out

    def table(self) -> dict[str, dict[int, float]]:
        """Mean oracle score of each selector's pick, by K (``random``: the expected score of a uniform pick)."""
        rows: dict[str, dict[int, float]] = {"random": {}, "helpfulness_rm": {}, "oracle": {}}
        if self.safety is not None:
            rows["safety_aware_rm"] = {}
        for k in self.ks:
            rows["random"][k] = float(self.oracle[:, :k].mean())
            for name, index in self.picks(k).items():
                rows[name][k] = float(self.oracle.gather(1, index[:, None]).mean())
        return rows

    def unsafe_table(self) -> dict[str, dict[int, float]]:
        """Share of unsafe picks of each selector, by K."""
        rows: dict[str, dict[int, float]] = {"random": {}}
        for k in self.ks:
            rows["random"][k] = float(self.unsafe[:, :k].float().mean())
            for name, index in self.picks(k).items():
                rows.setdefault(name, {})[k] = float(self.unsafe.gather(1, index[:, None]).float().mean())
        return rows


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
