"""Rejection-sampling fine-tuning (paper section 3.2.3): best-of-K from the latest policy.

"We sample K outputs from the model and select the best candidate with our reward"; the kept
sample is the "new gold standard", and the model is fine-tuned on the kept set, similar to SFT.
One iteration here:

1. **Sample** K responses per prompt from the current policy at temperature T, batched
   (``generate(..., num_samples=K)``) with per-sample seeds (``generation.SampleSeeds``, round =
   iteration, key = ``prompt_key``), so a sample depends only on the run's seed, the iteration, the
   prompt and its index k -- not on the batch or the GPU it was drawn on.
2. **Score** each response with both reward models (``RewardModels``): ``sigmoid`` of the scalar
   head read at the last real token of the finished dialog ``prompt + [assistant: response]``,
   encoded exactly as the reward models were trained (``reward_metrics.encode_scored_dialog``, EOS
   included) and as the kept sample will be fine-tuned on.
3. **Select** by R_c (section 3.2.3, Eq. 3): the safety score if the prompt is safety-tagged or the
   safety score is below 0.15, else the helpfulness score (``combined_reward``); the best eligible
   sample of each prompt is kept (``select_best``). A sample is eligible when it can be a training
   dialog: non-empty, free of the chat format's special tags, and finished with EOS (a response
   cut at ``max_new_tokens`` would teach the model to stop mid-sentence; the paper does not say).
4. **Pool** (section 3.2.3: up to RLHF-V3 only the previous iteration's samples were used, which
   caused regressions such as forgotten rhyming; afterwards the top-performing samples of all
   prior iterations were incorporated): the pool holds the kept sample of every iteration for
   every prompt, and the fine-tuning set takes, per prompt, the pool's sample with the highest R_c
   under the *latest* reward models (``update_pool``, ``pool_training_set``; the rule is ours, the paper gives none).
5. **Fine-tune** on that set with the SFT module (``configs/<size>/rejection_sampling.yaml``).

**Temperature rescaling** (section 3.2.3, Fig 8: the best temperature moves as the model changes;
1.2-1.3 for Llama 2-Chat-RLHF): ``temperature_sweep`` draws N samples per prompt at each
temperature and estimates the expected best-of-K reward with the unbiased order-statistics
estimator (``expected_order_statistic``) rather than one draw of K; ``run_rejection_sampling``
repeats it before every iteration and after the last, so the shift of the optimum shows.

**Fig 7** (max reward rises with K, median stays flat) is ``best_of_k_curves``: expected max and
median of K samples, by the reward models and by the toy world's oracle, and the oracle's score of
the reward models' pick.

Scale: the paper runs rejection sampling with the 70B model only and distils the result into the
smaller ones; here every size samples itself. ``RejectionSamplingPredictor`` runs the same
``rejection_sample`` under ``Trainer.predict``, so ``llama2-lit sample --devices 8`` spreads the
prompts over GPUs (each rank keeps full copies of the three models; rank 0 gathers and writes).

Record formats (``llama2_lit.data.records``): the kept samples are ``chat`` records whose
``meta`` is the prompt's (the oracle needs it) plus ``meta["rejection_sampling"]``: the scores
``reward_helpfulness``, ``reward_safety`` and ``reward`` (R_c, by the reward models of
``scored_at_iteration``), ``reward_at_sampling``, ``num_samples`` (K), ``temperature``,
``iteration``, ``sample_index``, ``is_safety``, ``prompt_key``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor

from llama2_lit.chat import SPECIAL_TAGS, ChatFormatError, encode_prompt
from llama2_lit.generation import SampleSeeds, generate
from llama2_lit.model import Transformer
from llama2_lit.reward_metrics import encode_scored_dialog, score_token_ids
from llama2_lit.rlhf.best_of_k import expected_max_of_k, expected_median_of_k, expected_order_statistic
from llama2_lit.rlhf.rewards import SAFETY_THRESHOLD, safety_first_reward
from llama2_lit.tokenizer import Tokenizer


DEFAULT_TEMPERATURES = (0.6, 0.8, 1.0, 1.2, 1.4)
"""The sweep's grid: Meta's chat default 0.6 up to beyond Fig 8's optimum for RLHF models (1.2-1.3)."""


# ================================================================================ prompt keys
def prompt_key(messages: Sequence[dict]) -> str:
    """A stable id of a prompt dialog (its JSON, hashed): the pool groups samples by it, and the
    sampling seeds (``SampleSeeds``) are made from it."""
    text = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


# ================================================================================ reward scorers
class Scorer(Protocol):
    """Scores responses: ``(helpfulness, safety)``, each (n,) float in [0, 1]."""

    def __call__(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str],
                 metas: Sequence[dict]) -> tuple[Tensor, Tensor]: ...


class RewardModels:
    """The helpfulness and safety reward models (scalar-head ``Transformer``s), paper section 3.2.2.

    A response is scored as the finished dialog ``prompt + [assistant: response]`` as the models
    were trained on it (``reward_metrics.encode_scored_dialog``, EOS included); the reward is
    ``sigmoid`` of ``score_sequences`` at its last real token. A response
    the chat format cannot encode (it contains ``[INST]`` or another special tag) cannot be kept
    and scores 0.
    """

    def __init__(self, helpfulness: Transformer, safety: Transformer, tokenizer: Tokenizer, *,
                 batch_size: int = 32) -> None:
        for name, model in (("helpfulness", helpfulness), ("safety", safety)):
            if model.score is None:
                raise ValueError(f"the {name} reward model has no scalar head (load it with scalar_head=True)")
        self.helpfulness, self.safety, self.tokenizer, self.batch_size = helpfulness, safety, tokenizer, batch_size

    @classmethod
    def from_checkpoints(cls, helpfulness: str | Path, safety: str | Path, tokenizer: Tokenizer, *,
                         device: torch.device | str = "cpu", batch_size: int = 32) -> RewardModels:
        from llama2_lit.reward_metrics import load_reward_model

        return cls(load_reward_model(helpfulness, device=str(device)), load_reward_model(safety, device=str(device)),
                   tokenizer, batch_size=batch_size)

    def score(self, model: Transformer, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> Tensor:
        """``sigmoid(score_sequences)`` of each finished dialog, (n,) float32 on the CPU."""
        encoded: list[list[int] | None] = []
        for messages, response in zip(prompts, responses):
            try:
                encoded.append(encode_scored_dialog(self.tokenizer, list(messages), response, model.config.max_seq_len))
            except ChatFormatError:
                encoded.append(None)
        scores = torch.zeros(len(encoded))
        rows = [i for i, ids in enumerate(encoded) if ids is not None]
        if rows:
            logits = score_token_ids(model, [encoded[i] for i in rows], batch_size=self.batch_size)
            scores[rows] = torch.sigmoid(logits)
        return scores

    def __call__(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str],
                 metas: Sequence[dict]) -> tuple[Tensor, Tensor]:
        return self.score(self.helpfulness, prompts, responses), self.score(self.safety, prompts, responses)


class OracleRewards:
    """The toy world's oracle standing in for both reward models (where no trained one exists).

    Helpfulness = ``judge(...).helpfulness``, safety = ``judge(...).safety_score`` (both in [0, 1];
    an unsafe reply scores at most 0.25, two harm markers 0.125 < 0.15). A perfect reward model,
    so best-of-K by it is the ceiling a learned one can approach -- never report it as an RM.
    """

    def __call__(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str],
                 metas: Sequence[dict]) -> tuple[Tensor, Tensor]:
        from llama2_lit.data.oracle import judge

        judgements = [judge(list(m), r, meta) for m, r, meta in zip(prompts, responses, metas)]
        return (torch.tensor([j.helpfulness for j in judgements], dtype=torch.float32),
                torch.tensor([j.safety_score for j in judgements], dtype=torch.float32))


def oracle_helpfulness(prompts: Sequence[Sequence[dict]], responses: Sequence[str], metas: Sequence[dict]) -> Tensor:
    """The oracle's helpfulness of each response, (n,) float32: the true score the RMs estimate."""
    from llama2_lit.data.oracle import judge

    return torch.tensor([judge(list(m), r, meta).helpfulness for m, r, meta in zip(prompts, responses, metas)],
                        dtype=torch.float32)


# ================================================================================ selection (pure)
def combined_reward(helpfulness: Tensor, safety: Tensor, is_safety: Tensor,
                    threshold: float = SAFETY_THRESHOLD) -> Tensor:
    """R_c of every sample: ``helpfulness`` and ``safety`` (P, K); ``is_safety`` (P,) or (P, K)."""
    is_safety = is_safety.bool()
    if is_safety.dim() == helpfulness.dim() - 1:
        is_safety = is_safety[..., None].expand_as(helpfulness)
    return safety_first_reward(helpfulness, safety, is_safety, threshold)


def select_best(reward: Tensor, eligible: Tensor | None = None) -> Tensor:
    """(P,) long: index of the highest-reward eligible sample of each prompt (reward (P, K));
    the first one on ties; -1 where no sample is eligible."""
    if eligible is None:
        eligible = torch.ones_like(reward, dtype=torch.bool)
    best = reward.masked_fill(~eligible, -math.inf).argmax(dim=-1)
    return torch.where(eligible.any(dim=-1), best, torch.full_like(best, -1))


def is_eligible(response: str, eos: bool, *, require_eos: bool = True) -> bool:
    """Whether a sample can become a training dialog (see the module docstring, step 3)."""
    return bool(response.strip()) and not any(tag in response for tag in SPECIAL_TAGS) and (eos or not require_eos)


# ================================================================================ curves
def best_of_k_curves(reward: Tensor, oracle: Tensor | None, ks: Sequence[int]) -> list[dict[str, float]]:
    """Fig 7: per K, the expected max and median reward (R_c) of K samples, averaged over prompts;
    with ``oracle`` (P, N) also the oracle's max and median and its score of the reward's pick."""
    rows = []
    for k in ks:
        row = {"k": int(k), "reward_max": expected_max_of_k(reward, k).mean().item(),
               "reward_median": expected_median_of_k(reward, k).mean().item()}
        if oracle is not None:
            row |= {"oracle_max": expected_max_of_k(oracle, k).mean().item(),
                    "oracle_median": expected_median_of_k(oracle, k).mean().item(),
                    "oracle_of_pick": expected_order_statistic(oracle, k, k, order_by=reward).mean().item()}
        rows.append(row)
    return rows


def pick_agreement(reward: Tensor, oracle: Tensor, eligible: Tensor | None = None) -> dict[str, float]:
    """How often the reward's pick among the (eligible) samples is also the oracle's.

    ``pick_agreement``: the pick has the oracle's best score among the samples (oracle ties are
    common -- several samples with the same correct answer -- and any of them counts);
    ``pick_same_index``: the very same sample as the oracle's first-best; ``oracle_of_pick``,
    ``oracle_of_oracle_pick``, ``oracle_mean``: mean oracle score of the reward's pick, of the
    oracle's own pick (the ceiling) and of a random eligible sample. Prompts without an eligible
    sample are left out.
    """
    if eligible is None:
        eligible = torch.ones_like(reward, dtype=torch.bool)
    rm_pick, oracle_pick = select_best(reward, eligible), select_best(oracle, eligible)
    rows = rm_pick >= 0
    if not rows.any():
        return {"pick_agreement": math.nan, "pick_same_index": math.nan, "oracle_of_pick": math.nan,
                "oracle_of_oracle_pick": math.nan, "oracle_mean": math.nan}
    picked = oracle.gather(-1, rm_pick.clamp(min=0)[:, None]).squeeze(-1)[rows]
    best = oracle.gather(-1, oracle_pick.clamp(min=0)[:, None]).squeeze(-1)[rows]
    mean = (oracle * eligible).sum(-1)[rows] / eligible.sum(-1)[rows]
    return {"pick_agreement": (picked == best).float().mean().item(),
            "pick_same_index": (rm_pick == oracle_pick)[rows].float().mean().item(),
            "oracle_of_pick": picked.mean().item(), "oracle_of_oracle_pick": best.mean().item(),
            "oracle_mean": mean.mean().item()}


# ================================================================================ sampling
@dataclass
class PromptSamples:
    """The K samples of one prompt, their scores and the kept one."""

    index: int
    """Position of the prompt in the list it came from."""
    key: str
    messages: list[dict]
    meta: dict
    is_safety: bool
    responses: list[str]
    eos: list[bool]
    eligible: list[bool]
    reward_helpfulness: list[float]
    reward_safety: list[float]
    reward: list[float]
    """R_c of each sample."""
    best: int
    """Index of the kept sample; -1 when no sample is eligible."""
    oracle: list[float] | None = None
    """The oracle's helpfulness of each sample (when asked for)."""


def draw_samples(policy: Transformer, tokenizer: Tokenizer, prompts: Sequence[dict], *, num_samples: int,
                 temperature: float, top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                 iteration: int = 1, batch_size: int = 64) -> list[tuple[list[str], list[bool]]]:
    """K responses per ``prompts`` record (texts, ended-with-EOS flags), about ``batch_size`` rows
    (prompts x K) per ``generate`` call; per-sample seeds from ``SampleSeeds``, so the result does not
    depend on ``batch_size``."""
    from llama2_lit.parallelize import prepare_for_inference_mode

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    room = policy.config.max_seq_len - max_new_tokens
    encoded = []
    for index, record in enumerate(prompts):
        try:
            encoded.append(encode_prompt(tokenizer, record["messages"], max_len=room))
        except ChatFormatError as error:
            raise ValueError(f"prompt {index}: {error}") from None
    seeds = SampleSeeds(seed=seed, round=iteration)
    keys = [prompt_key(record["messages"]) for record in prompts]
    prepare_for_inference_mode(policy, tokenizer.bos_id)
    texts: list[str] = []
    finished: list[bool] = []
    per_batch = max(1, batch_size // num_samples)  # prompts per generate call (batch_size rows)
    for start in range(0, len(encoded), per_batch):
        out = generate(policy, encoded[start:start + per_batch], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, eos_id=tokenizer.eos_id, num_samples=num_samples,
                       generator=seeds(keys[start:start + per_batch], num_samples))
        texts += [tokenizer.decode(tokens) for tokens in out.response_tokens()]
        finished += out.eos_emitted.tolist()
    return [(texts[i * num_samples:(i + 1) * num_samples], finished[i * num_samples:(i + 1) * num_samples])
            for i in range(len(prompts))]


def rejection_sample(policy: Transformer, scorer: Scorer, tokenizer: Tokenizer, prompts: Sequence[dict], *,
                     num_samples: int, temperature: float, top_p: float = 1.0, max_new_tokens: int = 64,
                     seed: int = 0, iteration: int = 1, threshold: float = SAFETY_THRESHOLD,
                     require_eos: bool = True, batch_size: int = 64, with_oracle: bool = False,
                     indices: Sequence[int] | None = None) -> list[PromptSamples]:
    """Steps 1-3 of the module docstring for ``prompts`` records: K samples each, scored, best kept.

    ``with_oracle`` also judges every sample with the toy world's oracle (for the reports).
    ``indices`` names the prompts' positions in a larger list (ranks of ``Trainer.predict``).
    """
    drawn = draw_samples(policy, tokenizer, prompts, num_samples=num_samples, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, seed=seed, iteration=iteration, batch_size=batch_size)
    flat_prompts = [r["messages"] for r in prompts for _ in range(num_samples)]
    flat_metas = [r.get("meta") or {} for r in prompts for _ in range(num_samples)]
    flat_responses = [text for texts, _ in drawn for text in texts]
    helpfulness, safety = scorer(flat_prompts, flat_responses, flat_metas)
    shape = (len(prompts), num_samples)
    helpfulness, safety = helpfulness.reshape(shape), safety.reshape(shape)
    is_safety = torch.tensor([bool(r.get("is_safety", False)) for r in prompts])
    reward = combined_reward(helpfulness, safety, is_safety, threshold)
    eligible = torch.tensor([[is_eligible(t, e, require_eos=require_eos) for t, e in zip(*pair)] for pair in drawn],
                            dtype=torch.bool).reshape(shape)
    best = select_best(reward, eligible)
    oracle = oracle_helpfulness(flat_prompts, flat_responses, flat_metas).reshape(shape) if with_oracle else None
    return [PromptSamples(index=indices[i] if indices is not None else i, key=prompt_key(record["messages"]),
                          messages=list(record["messages"]), meta=dict(record.get("meta") or {}),
                          is_safety=bool(is_safety[i]), responses=drawn[i][0], eos=drawn[i][1],
                          eligible=eligible[i].tolist(), reward_helpfulness=helpfulness[i].tolist(),
                          reward_safety=safety[i].tolist(), reward=reward[i].tolist(), best=int(best[i]),
                          oracle=oracle[i].tolist() if oracle is not None else None)
            for i, record in enumerate(prompts)]


def stacked(samples: Sequence[PromptSamples], name: str) -> Tensor:
    """(P, K) tensor of one per-sample field (``reward``, ``oracle``, ``eligible``, ...)."""
    return torch.tensor([getattr(s, name) for s in samples])


# ================================================================================ records and the pool
def best_records(samples: Sequence[PromptSamples], *, iteration: int, temperature: float) -> list[dict]:
    """The kept sample of every prompt that has one, as ``chat`` records (see the module docstring)."""
    records = []
    for s in samples:
        if s.best < 0:
            continue
        k = s.best
        info = {"reward_helpfulness": s.reward_helpfulness[k], "reward_safety": s.reward_safety[k],
                "reward": s.reward[k], "reward_at_sampling": s.reward[k], "scored_at_iteration": iteration,
                "num_samples": len(s.responses), "temperature": temperature, "iteration": iteration,
                "sample_index": k, "is_safety": s.is_safety, "prompt_key": s.key}
        records.append({"messages": [*s.messages, {"role": "assistant", "content": s.responses[k].strip()}],
                        "meta": {**s.meta, "rejection_sampling": info}})
    return records


def sample_rows(samples: Sequence[PromptSamples]) -> list[dict]:
    """Every sample, kept or not, with its scores (``samples.jsonl``: for analysis, not a record kind)."""
    rows = []
    for s in samples:
        for k, response in enumerate(s.responses):
            rows.append({"prompt_key": s.key, "prompt_index": s.index, "sample_index": k, "kept": k == s.best,
                         "eligible": s.eligible[k], "eos": s.eos[k], "is_safety": s.is_safety,
                         "reward_helpfulness": s.reward_helpfulness[k], "reward_safety": s.reward_safety[k],
                         "reward": s.reward[k], "oracle": s.oracle[k] if s.oracle is not None else None,
                         "prompt": s.messages[-1]["content"], "response": response})
    return rows


def _info(record: dict) -> dict:
    try:
        return record["meta"]["rejection_sampling"]
    except (KeyError, TypeError):
        raise ValueError("a pool record needs meta['rejection_sampling'] (written by best_records); got meta "
                         f"{record.get('meta')!r}") from None


def update_pool(pool: Sequence[dict], best: Sequence[dict]) -> list[dict]:
    """The pool after an iteration: ``pool`` (kept samples of earlier iterations) plus ``best``.

    Records of ``pool`` from the iteration of ``best`` or later are dropped first (re-running an
    iteration replaces its samples), and a response kept in several iterations for the same prompt
    is held once, by its latest iteration.
    """
    iterations = {_info(r)["iteration"] for r in best}
    if len(iterations) > 1:
        raise ValueError(f"best records of one iteration expected, got iterations {sorted(iterations)}")
    current = iterations.pop() if iterations else math.inf
    merged: dict[tuple[str, str], dict] = {}
    for record in [*(r for r in pool if _info(r)["iteration"] < current), *best]:
        merged[(_info(record)["prompt_key"], record["messages"][-1]["content"])] = record
    return sorted(merged.values(), key=lambda r: (_info(r)["iteration"], _info(r)["prompt_key"]))


def score_records(records: Sequence[dict], scorer: Scorer, *, threshold: float = SAFETY_THRESHOLD
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(R_h, R_s, R_c), each (n,), of finished ``chat`` records (the last message is the response)."""
    if not records:
        empty = torch.zeros(0)
        return empty, empty, empty
    prompts = [r["messages"][:-1] for r in records]
    responses = [r["messages"][-1]["content"] for r in records]
    helpfulness, safety = scorer(prompts, responses, [r.get("meta") or {} for r in records])
    is_safety = torch.tensor([bool(_info(r)["is_safety"]) for r in records])
    return helpfulness, safety, combined_reward(helpfulness, safety, is_safety, threshold)


def pool_training_set(pool: Sequence[dict], scorer: Scorer, *, iteration: int,
                      threshold: float = SAFETY_THRESHOLD) -> list[dict]:
    """The fine-tuning set: per prompt, the pool record with the highest R_c under ``scorer`` (the
    latest reward models), re-scored (its ``reward*`` fields and ``scored_at_iteration`` updated).
    Ties go to the latest iteration."""
    helpfulness, safety, reward = score_records(pool, scorer, threshold=threshold)
    best: dict[str, tuple[float, int, dict]] = {}
    for i, record in enumerate(pool):
        info = _info(record)
        rescored = {**record, "meta": {**record["meta"], "rejection_sampling": {
            **info, "reward_helpfulness": helpfulness[i].item(), "reward_safety": safety[i].item(),
            "reward": reward[i].item(), "scored_at_iteration": iteration}}}
        candidate = (reward[i].item(), info["iteration"], rescored)
        key = info["prompt_key"]
        if key not in best or candidate[:2] > best[key][:2]:
            best[key] = candidate
    return [best[key][2] for key in sorted(best)]


# ================================================================================ temperature sweep
@dataclass
class TemperatureSweep:
    """Expected best-of-K curves per temperature (Fig 8) and the best temperature."""

    rows: list[dict[str, float]]
    """One row per (temperature, k): ``best_of_k_curves`` columns plus ``temperature``."""
    target_k: int
    best_temperature: float
    """The temperature with the highest expected max reward at ``target_k`` (what selection uses)."""
    best_temperature_by_oracle: float | None = None
    """The temperature whose reward pick at ``target_k`` the oracle scores highest (when judged)."""
    samples: dict[float, list[PromptSamples]] = field(default_factory=dict, repr=False)

    def at(self, k: int) -> dict[float, dict[str, float]]:
        return {row["temperature"]: row for row in self.rows if row["k"] == k}


def default_ks(num_samples: int) -> list[int]:
    """1, 2, 4, ... up to ``num_samples`` (included)."""
    ks = [1]
    while ks[-1] * 2 < num_samples:
        ks.append(ks[-1] * 2)
    return sorted({*ks, num_samples})


def temperature_sweep(policy: Transformer, scorer: Scorer, tokenizer: Tokenizer, prompts: Sequence[dict], *,
                      temperatures: Sequence[float] = DEFAULT_TEMPERATURES, num_samples: int = 32,
                      target_k: int | None = None, ks: Sequence[int] | None = None, with_oracle: bool = True,
                      keep_samples: bool = False, **sampling: Any) -> TemperatureSweep:
    """The temperature that maximises the expected best-of-K reward of ``policy`` (paper Fig 8).

    N = ``num_samples`` samples per prompt at each temperature; E[max of K] for every K of ``ks``
    (default 1, 2, 4, ..., N) by the unbiased order-statistics estimator. Every temperature uses the
    same sample seeds (common random numbers: differences between temperatures are not seed noise).
    ``sampling``: ``rejection_sample``'s other arguments (``max_new_tokens``, ``seed``, ...).
    """
    ks = list(ks) if ks is not None else default_ks(num_samples)
    target_k = target_k if target_k is not None else max(ks)
    if target_k not in ks:
        ks = sorted({*ks, target_k})
    if max(ks) > num_samples:
        raise ValueError(f"K={max(ks)} needs at least as many samples per prompt, got num_samples={num_samples}")
    rows, kept = [], {}
    for temperature in temperatures:
        samples = rejection_sample(policy, scorer, tokenizer, prompts, num_samples=num_samples,
                                   temperature=temperature, with_oracle=with_oracle, **sampling)
        oracle = stacked(samples, "oracle") if with_oracle else None
        rows += [{"temperature": float(temperature), **row}
                 for row in best_of_k_curves(stacked(samples, "reward"), oracle, ks)]
        if keep_samples:
            kept[float(temperature)] = samples
    at_target = [row for row in rows if row["k"] == target_k]
    best = max(at_target, key=lambda row: row["reward_max"])["temperature"]
    by_oracle = max(at_target, key=lambda row: row["oracle_of_pick"])["temperature"] if with_oracle else None
    return TemperatureSweep(rows, target_k, best, by_oracle, kept)


# ================================================================================ evaluation
def paired_gap(new: Sequence[float], old: Sequence[float]) -> dict[str, float]:
    """Mean per-prompt difference ``new - old`` of scores on the same prompts, its standard error
    over prompts, and how many prompts got better and worse."""
    difference = torch.tensor(new, dtype=torch.float64) - torch.tensor(old, dtype=torch.float64)
    stderr = difference.std().item() / math.sqrt(len(difference)) if len(difference) > 1 else math.nan
    return {"helpfulness_gap": difference.mean().item(), "helpfulness_gap_stderr": stderr,
            "prompts_better": int((difference > 0).sum()), "prompts_worse": int((difference < 0).sum())}


def evaluate_policies(checkpoints: dict[str, str | Path], prompts: Sequence[dict], tokenizer: Tokenizer, *,
                      max_new_tokens: int = 64, baseline: str | None = None,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Oracle helpfulness, accuracy and violation rate of greedy answers to held-out ``prompts``
    (``evaluation.suite_summary``), per model; and each model's gap to ``baseline`` (default: the
    first, e.g. the SFT model): the mean per-prompt helpfulness difference and its standard error
    over prompts (paired: the same prompts, greedy answers)."""
    from llama2_lit.checkpoints import load_model
    from llama2_lit.evaluation import oracle_answers, suite_summary

    helpfulness: dict[str, list[float]] = {}
    summaries: dict[str, dict[str, float]] = {}
    for name, checkpoint in checkpoints.items():
        model = load_model(checkpoint, device=device).eval()
        results = oracle_answers(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
        summaries[name] = suite_summary(results)
        helpfulness[name] = [r["judgement"].helpfulness for r in results]
    baseline = baseline or next(iter(checkpoints))
    gaps = {name: paired_gap(helpfulness[name], helpfulness[baseline]) for name in checkpoints if name != baseline}
    return {"baseline": baseline, "summaries": summaries, "gaps": gaps, "per_prompt": helpfulness}


# ================================================================================ runs
def checkpoint_tokenizer(checkpoint: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """``tokenizer_path`` if given, else the one the checkpoint was trained with (``find_tokenizer``)."""
    from llama2_lit.checkpoints import find_tokenizer

    return Path(tokenizer_path) if tokenizer_path is not None else find_tokenizer(checkpoint)


class _RunLog:
    """Per-iteration scalars in ``OUT/metrics.csv`` (step = iteration) and W&B (offline), tables in W&B.

    W&B is opened only to flush (and finished at once), so the fine-tuning runs started in between
    (``lightning_main`` closes whatever W&B run is current) never touch this one."""

    def __init__(self, out_dir: Path, *, iteration: int, wandb: bool, name: str) -> None:
        from llama2_lit.stages.loggers import RunCSVLogger

        self.out_dir, self.wandb = out_dir, wandb
        info_path = out_dir / "run.json"
        if info_path.is_file():
            self.info = json.loads(info_path.read_text())
        else:
            import secrets

            self.info = {"name": f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", "stage": "rejection_sampling",
                         "wandb_id": secrets.token_hex(4), "project": "llama2_lit", "job_type": "rejection_sampling"}
            out_dir.mkdir(parents=True, exist_ok=True)
            info_path.write_text(json.dumps(self.info, indent=2) + "\n")
        self.csv = RunCSVLogger(out_dir, resume_step=iteration)
        self.pending: list[tuple[str, Any, int | None]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.csv.log_metrics(values, step)
        self.pending.append(("metrics", values, step))

    def table(self, key: str, rows: list[dict]) -> None:
        if rows:
            self.pending.append(("table", (key, list(rows[0]), [list(r.values()) for r in rows]), None))

    def flush(self) -> None:
        if not (self.wandb and self.pending):
            self.pending = []
            return
        import os

        import wandb
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        logger = WandbLogger(name=self.info["name"], project=self.info["project"], id=self.info["wandb_id"],
                             job_type="rejection_sampling", save_dir=str(self.out_dir), resume="allow",
                             settings=wandb.Settings(quiet=True))  # flushed several times a run: no summaries
        for kind, payload, step in self.pending:
            if kind == "metrics":
                logger.log_metrics(payload, step)
            else:
                key, columns, data = payload
                logger.log_table(key, columns=columns, data=data)
        logger.experiment.finish()
        self.pending = []


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomically(path, buffer.getvalue())


def finetune_on_records(train_file: str | Path, init_from: str | Path, config: str | Path, run_dir: str | Path,
                        extra_args: Sequence[str] = ()) -> Path:
    """SFT on ``train_file`` (``chat`` records) from ``init_from`` with ``config`` (an SFT config,
    e.g. ``configs/<size>/rejection_sampling.yaml``); returns the run's ``last.ckpt``."""
    from llama2_lit.stages.cli import lightning_main

    run_dir = Path(run_dir)
    args = ["fit", "--config", str(config), "--model.init_args.init_from", str(init_from),
            "--data.init_args.train_files", json.dumps([str(train_file)]), "--run.dir", str(run_dir),
            "--run.overwrite", "true", "--trainer.enable_progress_bar", "false", *extra_args]
    if lightning_main(args) != 0:
        raise RuntimeError(f"fine-tuning on {train_file} failed (see the messages above); run: {run_dir}")
    return run_dir / "checkpoints" / "last.ckpt"


def run_rejection_sampling_iteration(
    policy_ckpt: str | Path, rm_helpfulness_ckpt: str | Path | None, rm_safety_ckpt: str | Path | None,
    prompts_file: str | Path, out_dir: str | Path, *, iteration: int = 1, num_samples: int = 16,
    temperature: float | None = None, temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    sweep_prompts: int = 48, sweep_samples: int | None = None, num_prompts: int | None = None,
    max_new_tokens: int = 64, top_p: float = 1.0, seed: int = 0, threshold: float = SAFETY_THRESHOLD,
    finetune_config: str | Path | None = None, finetune_args: Sequence[str] = (), eval_prompts_file: str | Path | None = None,
    eval_prompts: int = 100, baseline_ckpt: str | Path | None = None, tokenizer_path: str | Path | None = None,
    scorer: Scorer | None = None, batch_size: int = 64, require_eos: bool = True, device: str = "cpu",
    wandb: bool = True,
) -> dict[str, Any]:
    """One rejection-sampling iteration from checkpoints to a fine-tuned policy (module docstring).

    Sweeps ``temperatures`` on the first ``sweep_prompts`` prompts when ``temperature`` is None,
    samples ``num_samples`` per prompt for the first ``num_prompts`` prompts of ``prompts_file``,
    keeps the best, updates ``out_dir/pool.jsonl``, draws the fine-tuning set from the pool,
    fine-tunes with ``finetune_config`` (skipped when None) and evaluates the new policy against
    ``baseline_ckpt`` (default ``policy_ckpt``) on ``eval_prompts_file``. ``scorer`` replaces the
    reward models (e.g. ``OracleRewards()``; then the RM paths may be None). Returns the summary
    (also ``out_dir/iteration-<i>/summary.json``).
    """
    from llama2_lit.checkpoints import load_model
    from llama2_lit.data.records import load_records, write_jsonl, write_records

    started = time.time()
    out_dir = Path(out_dir)
    step_dir = out_dir / f"iteration-{iteration}"
    step_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(checkpoint_tokenizer(policy_ckpt, tokenizer_path))
    policy = load_model(policy_ckpt, device=device).eval()
    if scorer is None:
        if rm_helpfulness_ckpt is None or rm_safety_ckpt is None:
            raise ValueError("give both reward-model checkpoints, or a scorer")
        scorer = RewardModels.from_checkpoints(rm_helpfulness_ckpt, rm_safety_ckpt, tokenizer, device=device)
    prompts = load_records(prompts_file, "prompts")
    prompts = prompts[:num_prompts] if num_prompts is not None else prompts
    log = _RunLog(out_dir, iteration=iteration, wandb=wandb, name=f"rejection-sampling-{policy.config.name}")
    sampling = {"max_new_tokens": max_new_tokens, "top_p": top_p, "seed": seed, "iteration": iteration,
                "threshold": threshold, "batch_size": batch_size, "require_eos": require_eos}
    summary: dict[str, Any] = {"iteration": iteration, "policy": str(policy_ckpt), "num_samples": num_samples,
                               "prompts": len(prompts), "top_p": top_p, "max_new_tokens": max_new_tokens}

    # 1. Temperature rescaling (Fig 8).
    if temperature is None:
        sweep = temperature_sweep(policy, scorer, tokenizer, prompts[:sweep_prompts], temperatures=temperatures,
                                  num_samples=max(sweep_samples or num_samples, num_samples), target_k=num_samples,
                                  **sampling)
        temperature = sweep.best_temperature
        _write_csv(sweep.rows, step_dir / "sweep.csv")
        log.table(f"iteration-{iteration}/temperature_sweep", sweep.rows)
        summary["sweep"] = {"best_temperature": sweep.best_temperature,
                            "best_temperature_by_oracle": sweep.best_temperature_by_oracle,
                            "at_k": {str(t): row for t, row in sweep.at(num_samples).items()}}
    summary["temperature"] = temperature

    # 2-3. Sample, score, select (Fig 7 curves from the same samples).
    t0 = time.time()
    samples = rejection_sample(policy, scorer, tokenizer, prompts, num_samples=num_samples, temperature=temperature,
                               with_oracle=True, **sampling)
    summary["sampling_seconds"] = time.time() - t0
    reward, oracle, eligible = stacked(samples, "reward"), stacked(samples, "oracle"), stacked(samples, "eligible")
    curves = best_of_k_curves(reward, oracle, default_ks(num_samples))
    _write_csv(curves, step_dir / "curves.csv")
    log.table(f"iteration-{iteration}/best_of_k", curves)
    best = best_records(samples, iteration=iteration, temperature=temperature)
    write_jsonl(sample_rows(samples), step_dir / "samples.jsonl")
    if not best:
        raise ValueError(f"no prompt of {prompts_file} has an eligible sample at T={temperature} (every response "
                         f"empty, cut at max_new_tokens={max_new_tokens}, or holding a chat tag); see "
                         f"{step_dir / 'samples.jsonl'}")
    write_records(best, step_dir / "best.jsonl", "chat")
    summary |= {"kept": len(best), "eligible_fraction": eligible.float().mean().item(),
                "reward_kept_mean": sum(r["meta"]["rejection_sampling"]["reward"] for r in best) / max(1, len(best)),
                "reward_sample_mean": reward.mean().item(), "curves": curves, **pick_agreement(reward, oracle, eligible)}

    # 4. The pool and the fine-tuning set drawn from it.
    pool_path = out_dir / "pool.jsonl"
    previous = load_records(pool_path, "chat") if pool_path.is_file() else []
    pool = update_pool(previous, best)
    write_records(pool, pool_path, "chat")
    train = pool_training_set(pool, scorer, iteration=iteration, threshold=threshold)
    write_records(train, step_dir / "train.jsonl", "chat")
    from_earlier = sum(r["meta"]["rejection_sampling"]["iteration"] < iteration for r in train)
    summary |= {"pool": len(pool), "train": len(train), "train_from_earlier_iterations": from_earlier,
                "train_reward_mean": sum(r["meta"]["rejection_sampling"]["reward"] for r in train) / max(1, len(train))}

    # 5. Fine-tune, then evaluate against the baseline.
    if finetune_config is not None:
        log.flush()
        t0 = time.time()
        summary["finetuned"] = str(finetune_on_records(step_dir / "train.jsonl", policy_ckpt, finetune_config,
                                                       step_dir / "finetune", finetune_args))
        summary["finetune_seconds"] = time.time() - t0
        if eval_prompts_file is not None:
            held_out = load_records(eval_prompts_file, "prompts")[:eval_prompts]
            models = {"baseline": baseline_ckpt or policy_ckpt}
            if baseline_ckpt is not None and Path(baseline_ckpt) != Path(policy_ckpt):
                models["previous"] = policy_ckpt  # the policy this iteration sampled from
            models["finetuned"] = summary["finetuned"]
            evaluation = evaluate_policies(models, held_out, tokenizer, max_new_tokens=max_new_tokens, device=device)
            if "previous" in models:  # a pooled iteration must not regress
                per_prompt = evaluation["per_prompt"]
                evaluation["gaps"]["finetuned_vs_previous"] = paired_gap(per_prompt["finetuned"], per_prompt["previous"])
            summary["evaluation"] = evaluation
            for name, values in evaluation["summaries"].items():
                log.log({f"eval/{name}/{k}": v for k, v in values.items()}, iteration)
            for name, values in evaluation["gaps"].items():
                log.log({f"eval/gap/{name}/{k}": v for k, v in values.items()}, iteration)
    summary["seconds"] = time.time() - started
    log.log({f"rs/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            iteration)
    log.flush()
    _write_atomically(step_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def run_rejection_sampling(sft_ckpt: str | Path, rm_helpfulness_ckpt: str | Path | None,
                           rm_safety_ckpt: str | Path | None, prompts_file: str | Path, out_dir: str | Path, *,
                           iterations: int = 2, finetune_config: str | Path, final_sweep: bool = True,
                           **options: Any) -> dict[str, Any]:
    """``iterations`` rejection-sampling iterations from the SFT model (the one call for a report).

    Iteration i samples from iteration i-1's fine-tuned model (the first from ``sft_ckpt``), with a
    fresh temperature sweep each time (Fig 8), and fine-tunes that model on the pooled set; every
    fine-tuned model is evaluated against ``sft_ckpt``. ``final_sweep`` sweeps the last model too, so
    the optimum before and after shows. ``options``: ``run_rejection_sampling_iteration``'s.
    Returns ``{"iterations": [summaries], "final_sweep": {...}}`` (also ``out_dir/summary.json``).
    """
    from llama2_lit.checkpoints import load_model
    from llama2_lit.data.records import load_records

    out_dir = Path(out_dir)
    policy, results = sft_ckpt, []
    for iteration in range(1, iterations + 1):
        summary = run_rejection_sampling_iteration(policy, rm_helpfulness_ckpt, rm_safety_ckpt, prompts_file, out_dir,
                                                   iteration=iteration, finetune_config=finetune_config,
                                                   baseline_ckpt=sft_ckpt, **options)
        results.append(summary)
        policy = summary["finetuned"]
    report: dict[str, Any] = {"iterations": results}
    if final_sweep and options.get("temperature") is None:
        tokenizer = Tokenizer(checkpoint_tokenizer(sft_ckpt, options.get("tokenizer_path")))
        device = options.get("device", "cpu")
        scorer = options.get("scorer") or RewardModels.from_checkpoints(rm_helpfulness_ckpt, rm_safety_ckpt,
                                                                        tokenizer, device=device)
        num_samples = options.get("num_samples", 16)
        prompts = load_records(prompts_file, "prompts")[:options.get("sweep_prompts", 48)]
        sweep = temperature_sweep(load_model(policy, device=device).eval(), scorer, tokenizer, prompts,
                                  temperatures=options.get("temperatures", DEFAULT_TEMPERATURES),
                                  num_samples=max(options.get("sweep_samples") or num_samples, num_samples),
                                  target_k=num_samples, max_new_tokens=options.get("max_new_tokens", 64),
                                  top_p=options.get("top_p", 1.0), seed=options.get("seed", 0),
                                  iteration=iterations + 1, batch_size=options.get("batch_size", 64),
                                  threshold=options.get("threshold", SAFETY_THRESHOLD),
                                  require_eos=options.get("require_eos", True))
        _write_csv(sweep.rows, out_dir / "final_sweep.csv")
        report["final_sweep"] = {"policy": str(policy), "best_temperature": sweep.best_temperature,
                                 "best_temperature_by_oracle": sweep.best_temperature_by_oracle,
                                 "at_k": {str(t): row for t, row in sweep.at(num_samples).items()}}
    report["temperature_optimum"] = [r.get("sweep", {}).get("best_temperature") for r in results] + \
        ([report["final_sweep"]["best_temperature"]] if "final_sweep" in report else [])
    _write_atomically(out_dir / "summary.json", json.dumps(report, indent=2, default=str) + "\n")
    return report


# ================================================================================ Lightning predict loop
class RejectionSamplingPredictor(L.LightningModule):
    """``rejection_sample`` as a ``predict_step``: ``Trainer.predict`` gives each rank its share of
    the prompts (Lightning's distributed sampler), and at the end of the epoch rank 0 gathers every
    rank's samples (``all_gather_object``) and writes them to ``gathered_path`` (JSONL), which works
    alike for one process, ``ddp`` and ``ddp_spawn``.

    The models are loaded in ``configure_model`` on the rank's device (nothing is pickled to the
    workers). A batch is a list of ``(index, prompts record)``; ``collate_fn=list`` in the loader.
    """

    def __init__(self, policy_ckpt: str, rm_helpfulness_ckpt: str, rm_safety_ckpt: str, tokenizer_path: str,
                 gathered_path: str, *, num_samples: int, temperature: float, top_p: float = 1.0,
                 max_new_tokens: int = 64, seed: int = 0, iteration: int = 1, threshold: float = SAFETY_THRESHOLD,
                 require_eos: bool = True, batch_size: int = 64, with_oracle: bool = False) -> None:
        super().__init__()
        self.paths = (policy_ckpt, rm_helpfulness_ckpt, rm_safety_ckpt)
        self.tokenizer_path = tokenizer_path
        self.gathered_path = gathered_path
        self.options = {"num_samples": num_samples, "temperature": temperature, "top_p": top_p,
                        "max_new_tokens": max_new_tokens, "seed": seed, "iteration": iteration,
                        "threshold": threshold, "require_eos": require_eos, "batch_size": batch_size,
                        "with_oracle": with_oracle}
        self.policy: Transformer | None = None
        self.scorer: RewardModels | None = None
        self.outputs: list[PromptSamples] = []

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        from llama2_lit.checkpoints import load_model

        device = self.trainer.strategy.root_device
        self.policy = load_model(self.paths[0], device=device).eval()
        self.scorer = RewardModels.from_checkpoints(self.paths[1], self.paths[2], Tokenizer(self.tokenizer_path),
                                                    device=device)
        self.rm_helpfulness, self.rm_safety = self.scorer.helpfulness, self.scorer.safety  # submodules

    def predict_step(self, batch: list[tuple[int, dict]], batch_idx: int) -> list[PromptSamples]:
        indices, records = [i for i, _ in batch], [r for _, r in batch]
        samples = rejection_sample(self.policy, self.scorer, self.scorer.tokenizer, records, indices=indices,
                                   **self.options)
        self.outputs += samples
        return samples

    def on_predict_epoch_end(self) -> None:
        import dataclasses

        import torch.distributed as dist

        from llama2_lit.data.records import write_jsonl

        everything = self.outputs
        if dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.outputs)
            everything = [s for part in parts for s in part]
        if self.trainer.is_global_zero:  # the distributed sampler pads with repeats: one per index
            unique = sorted({s.index: s for s in everything}.values(), key=lambda s: s.index)
            write_jsonl([dataclasses.asdict(s) for s in unique], self.gathered_path)


def predict_rejection_samples(policy_ckpt: str | Path, rm_helpfulness_ckpt: str | Path, rm_safety_ckpt: str | Path,
                              prompts: Sequence[dict], *, tokenizer_path: str | Path,
                              trainer_options: dict[str, Any] | None = None, prompts_per_batch: int = 8,
                              **options: Any) -> list[PromptSamples]:
    """``rejection_sample`` over ``prompts`` with ``Trainer.predict`` (``trainer_options``: devices,
    accelerator, strategy, ...). Returns every prompt's samples, by index, on rank 0 (the process
    that called it under ``ddp_spawn``) and an empty list on the other ranks."""
    import tempfile

    from torch.utils.data import DataLoader

    with tempfile.TemporaryDirectory(prefix="llama2-lit-sample-") as folder:
        gathered = Path(folder) / "samples.jsonl"
        module = RejectionSamplingPredictor(str(policy_ckpt), str(rm_helpfulness_ckpt), str(rm_safety_ckpt),
                                            str(tokenizer_path), str(gathered), **options)
        loader = DataLoader(list(enumerate(prompts)), batch_size=prompts_per_batch, shuffle=False, collate_fn=list)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                            **(trainer_options or {}))
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        if not gathered.is_file():
            return []
        return [PromptSamples(**json.loads(line)) for line in gathered.read_text().splitlines()]


# ================================================================================ command line
