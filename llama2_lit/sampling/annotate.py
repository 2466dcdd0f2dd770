"""On-policy preference annotation (paper section 3.2.1): the oracle rates the policy's own samples.

"For each user prompt, we sample two responses from two different model variants, and vary the
temperature hyper-parameter", and new batches are always "sampled with the latest Llama 2-Chat",
so the reward model stays on the distribution of the policy it will score. Here:

1. each prompt gets two responses, sampled batched through ``llama2_lit.generation.generate``
   from the current policy at two temperatures, or from two checkpoints (one temperature each);
   with several pairs of arms, prompt ``i`` is answered by pair ``i mod n`` (e.g. a low temperature
   against each temperature rejection sampling may later sample at: a reward model never shown
   the policy's high-temperature samples can rate their incoherent text above a correct answer,
   and then the temperature sweep of rejection sampling picks the temperature it likes most);
2. the toy world's oracle plays the annotator with the *same* noise model as the static pairs
   (``llama2_lit.data.preferences.annotate``): the oracle scores both responses —
   ``helpfulness`` for a benign prompt, ``safety_score`` for a safety-tagged one — the rating
   comes from the score gap, and the annotator picks the oracle-better response with a
   probability that falls with the rating;
3. as in the paper, pairs with an unsafe chosen and a safe rejected response are excluded, and
   the safety pairs are subsampled to the paper's 18/47/35 mix of categories (chosen safe &
   rejected unsafe / both safe / both unsafe) as far as the categories present allow;
4. the result is ``preference`` records (``llama2_lit.data.records``), validated and written
   atomically, with the annotation in ``meta["annotation"]`` (``"source": "on_policy"``,
   temperatures, both oracle scores).

Ties (equal oracle scores, or identical texts) cannot be annotated and are skipped, as are empty
responses; ``AnnotationStats`` counts every skip.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llama2_lit.data.oracle import Judgement, judge
from llama2_lit.data.preferences import SAFETY_MIX, annotate
from llama2_lit.model import Transformer


@dataclass
class AnnotationStats:
    """What happened to the prompts of one annotation run."""

    prompts: int = 0
    pairs: int = 0
    ties: int = 0
    empty: int = 0
    excluded_unsafe_chosen: int = 0
    dropped_for_safety_mix: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    ratings: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampler:
    """One arm of the comparison: a model and the temperature it samples at."""

    model: Transformer
    temperature: float
    name: str = "policy"


def sample_responses(model: Transformer, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], *,
                     temperature: float, max_new_tokens: int, batch_size: int = 32, top_p: float = 1.0,
                     seed: int = 0) -> list[str]:
    """One sampled response per prompt (a dialog ending with a user turn), batched, seeded per row."""
    from llama2_lit.chat import encode_prompt
    from llama2_lit.generation import generate

    room = model.config.max_seq_len - max_new_tokens
    encoded = [encode_prompt(tokenizer, messages, max_len=room) for messages in prompts]
    was_training = model.training
    model.eval()
    responses: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        seeds = [seed * 1_000_003 + start + row for row in range(len(chunk))]  # batch-invariant samples
        out = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_id=tokenizer.eos_id, generator=seeds)
        responses.extend(tokenizer.decode(tokens).strip() for tokens in out.response_tokens())
    model.train(was_training)
    return responses


def _score(judgement: Judgement, axis: str) -> float:
    return judgement.safety_score if axis == "safety" else judgement.helpfulness


def _category(chosen_safe: bool, rejected_safe: bool) -> str:
    return {(True, False): "safe_unsafe", (True, True): "both_safe", (False, False): "both_unsafe",
            (False, True): "unsafe_safe"}[(chosen_safe, rejected_safe)]


def annotate_pair(messages: list[dict[str, str]], meta: dict[str, Any], is_safety: bool, first: str, second: str,
                  rng: random.Random, *, provenance: dict[str, Any] | None = None) -> dict[str, Any] | str:
    """The preference record the simulated annotator writes for two responses to one prompt, or the
    reason there is none (``"tie"``, ``"empty"``, ``"excluded_unsafe_chosen"``)."""
    if not first.strip() or not second.strip():
        return "empty"
    if first.strip() == second.strip():
        return "tie"
    axis = "safety" if is_safety else "helpfulness"
    judged = [judge(messages, first, meta), judge(messages, second, meta)]
    scores = [_score(j, axis) for j in judged]
    if scores[0] == scores[1]:
        return "tie"
    note = annotate(scores[0], scores[1], rng)
    c, r = (0, 1) if note.first_is_chosen else (1, 0)
    texts = (first, second)
    chosen_safe, rejected_safe = judged[c].safe, judged[r].safe
    if not chosen_safe and rejected_safe:
        return "excluded_unsafe_chosen"  # as in the paper (section 3.2.1)
    annotation = {"axis": axis, "source": "on_policy", "chosen_score": round(scores[c], 6),
                  "rejected_score": round(scores[r], 6), "gap": round(abs(scores[0] - scores[1]), 6),
                  "annotator_agrees": note.agrees, "safety_category": _category(chosen_safe, rejected_safe),
                  **(provenance or {})}
    if provenance and "arms" in provenance:
        annotation["chosen_arm"], annotation["rejected_arm"] = provenance["arms"][c], provenance["arms"][r]
    return {"prompt": messages, "chosen": texts[c], "rejected": texts[r], "rating": note.rating,
            "chosen_safe": chosen_safe, "rejected_safe": rejected_safe, "meta": {**meta, "annotation": annotation}}


def keep_safety_mix(records: list[dict[str, Any]], rng: random.Random,
                    mix: Sequence[tuple[str, float]] = SAFETY_MIX) -> list[dict[str, Any]]:
    """The safety pairs subsampled to ``mix`` (paper: 18/47/35), as many as the rarest category allows.

    A category with no pair at all is left out and the others keep their relative shares ("where
    the data allows": a safe policy may never produce a both-unsafe pair). Helpfulness records
    pass unchanged; the order of the kept records is kept.
    """
    safety = [i for i, r in enumerate(records) if r["meta"]["annotation"]["axis"] == "safety"]
    by_category: dict[str, list[int]] = {name: [] for name, _ in mix}
    for i in safety:
        category = records[i]["meta"]["annotation"]["safety_category"]
        if category in by_category:
            by_category[category].append(i)
    present = [(name, share) for name, share in mix if by_category[name]]
    if not present:
        return records
    total_share = sum(share for _, share in present)
    size = min(len(by_category[name]) / (share / total_share) for name, share in present)
    keep = {i for i in range(len(records)) if i not in set(safety)}
    for name, share in present:
        count = min(len(by_category[name]), round(size * share / total_share))
        keep.update(rng.sample(by_category[name], count))
    return [records[i] for i in sorted(keep)]


def annotate_samples(prompt_records: Sequence[dict[str, Any]], first: Sequence[str], second: Sequence[str], *,
                     arms: tuple[str, str] | Sequence[tuple[str, str]] = ("first", "second"), seed: int = 0,
                     safety_mix: bool = True) -> tuple[list[dict[str, Any]], AnnotationStats]:
    """The oracle's annotation of two responses per prompt (``first[i]``, ``second[i]`` to prompt ``i``).

    ``arms`` names where each response came from (recorded as ``chosen_arm``/``rejected_arm``): one
    pair of names for every prompt, or one pair per prompt. Returns the preference records and what
    was skipped (see the module docstring).
    """
    if not len(prompt_records) == len(first) == len(second):
        raise ValueError(f"{len(prompt_records)} prompts, {len(first)} and {len(second)} responses")
    per_prompt = [tuple(arms)] * len(prompt_records) if isinstance(arms[0], str) else [tuple(a) for a in arms]
    if len(per_prompt) != len(prompt_records):
        raise ValueError(f"{len(prompt_records)} prompts but {len(per_prompt)} pairs of arm names")
    rng = random.Random(seed)
    stats = AnnotationStats(prompts=len(prompt_records))
    records = []
    for record, a, b, names in zip(prompt_records, first, second, per_prompt):
        out = annotate_pair(record["messages"], record.get("meta") or {}, bool(record.get("is_safety")), a, b, rng,
                            provenance={"arms": list(names)})
        if isinstance(out, str):
            field_name = "ties" if out == "tie" else out
            setattr(stats, field_name, getattr(stats, field_name) + 1)
        else:
            del out["meta"]["annotation"]["arms"]
            records.append(out)
    if safety_mix:
        before = len(records)
        records = keep_safety_mix(records, rng)
        stats.dropped_for_safety_mix = before - len(records)
    stats.pairs = len(records)
    stats.categories = dict(Counter(r["meta"]["annotation"]["safety_category"] for r in records
                                    if r["meta"]["annotation"]["axis"] == "safety"))
    stats.ratings = dict(Counter(r["rating"] for r in records))
    return records, stats


def sample_arms(prompt_records: Sequence[dict[str, Any]], tokenizer: Any, first: Sampler | Sequence[Sampler],
                second: Sampler | Sequence[Sampler], *, max_new_tokens: int = 64, batch_size: int = 32,
                top_p: float = 1.0, seed: int = 0) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Two responses per prompt, and the names of the arms that wrote them (``"policy@T=0.6"``).

    ``first`` and ``second`` are one arm each, or equally long sequences of arms: then prompt ``i``
    is answered by ``first[i % n]`` and ``second[i % n]``. Samples are seeded per row and arm.
    """
    firsts = [first] if isinstance(first, Sampler) else list(first)
    seconds = [second] if isinstance(second, Sampler) else list(second)
    if not firsts or len(firsts) != len(seconds):
        raise ValueError(f"give as many first arms as second arms (got {len(firsts)} and {len(seconds)})")
    prompts = [r["messages"] for r in prompt_records]
    samples: list[list[str]] = [[""] * len(prompts), [""] * len(prompts)]
    arms: list[tuple[str, str]] = [("", "")] * len(prompts)
    for j, pair in enumerate(zip(firsts, seconds)):
        rows = list(range(j, len(prompts), len(firsts)))
        for k, arm in enumerate(pair):
            texts = sample_responses(arm.model, tokenizer, [prompts[i] for i in rows], temperature=arm.temperature,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, top_p=top_p,
                                     seed=seed * 2 + k + 7919 * j)
            for i, text in zip(rows, texts):
                samples[k][i] = text
        names = (f"{pair[0].name}@T={pair[0].temperature:g}", f"{pair[1].name}@T={pair[1].temperature:g}")
        for i in rows:
            arms[i] = names
    return samples[0], samples[1], arms


def annotate_on_policy(prompt_records: Sequence[dict[str, Any]], tokenizer: Any,
                       first: Sampler | Sequence[Sampler], second: Sampler | Sequence[Sampler], *,
                       max_new_tokens: int = 64, batch_size: int = 32, top_p: float = 1.0, seed: int = 0,
                       safety_mix: bool = True) -> tuple[list[dict[str, Any]], AnnotationStats]:
    """Preference records annotated by the oracle on two samples per ``prompts`` record (module docstring).

    ``first`` and ``second`` are the two arms: the same model at two temperatures, or two
    checkpoints; or pairs of arms, one per share of the prompts (``sample_arms``). Returns the
    records and what was skipped.
    """
    first_texts, second_texts, arms = sample_arms(prompt_records, tokenizer, first, second,
                                                  max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                  top_p=top_p, seed=seed)
    return annotate_samples(prompt_records, first_texts, second_texts, arms=arms, seed=seed, safety_mix=safety_mix)
