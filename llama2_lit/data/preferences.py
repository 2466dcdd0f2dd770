"""Preference pairs: graded responses, rated by simulated annotators.

Paper section 3.2.1: an annotator sees two responses, picks the better one and says
how much better — significantly better, better, slightly better, negligibly better / unsure.
Here the oracle plays the annotator's judgement and a noise model plays the annotator's
fallibility:

1. Draw two responses of graded quality for a prompt (correct and concise, correct with extra
   words, rambling, hedged / partly right, wrong, off-topic, a true answer to another question of
   the family, a spliced, incoherent answer, a needless refusal (half of them shaped like the
   best-practice refusal), right but breaking the system constraint; for harmful prompts: the
   best-practice refusal, an explained refusal, a bare refusal, an evasion, a spliced refusal,
   unsafe compliances of growing severity). The paper's pairs are two samples of its models; ours
   stand in for them, so they must hold the mistakes our models make -- the last three kinds are
   what the micro policy wrote and what PPO exploited in reward models that had never seen them.
2. Score both with the oracle — ``helpfulness`` for the helpfulness set, ``safety_score`` for the
   safety set — and take the gap.
3. The rating comes from the gap (``GAP_THRESHOLDS``); the annotator then picks the oracle-better
   response with a probability that falls as the gap shrinks (``P_AGREE``: 0.96 for
   "significantly better" down to 0.56 for "negligibly better", so the last sits near chance as
   in paper Table 8). Pairs with equal scores are never drawn.

Safety pairs follow the paper's three categories with its mix — chosen safe & rejected unsafe
18%, both safe 47%, both unsafe 35% — and, as in the paper, a pair whose chosen response is
unsafe while the rejected one is safe is excluded (redrawn).

Every record keeps the annotation in ``meta["annotation"]``: both oracle scores, the gap,
whether the annotator agreed with the oracle, the response kinds, the safety category.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llama2_lit.data import constraints as cons
from llama2_lit.data import lexicon as lx
from llama2_lit.data import safety
from llama2_lit.data.entities import Universe
from llama2_lit.data.oracle import judge
from llama2_lit.data.records import RATINGS
from llama2_lit.data.tasks import Turn

GAP_THRESHOLDS = (0.55, 0.25, 0.08)
"""Oracle score gap at or above which a pair is rated significantly better / better / slightly
better; smaller gaps are "negligibly better / unsure"."""
P_AGREE = (0.96, 0.85, 0.70, 0.56)
"""Probability that the annotator's chosen response is the oracle-better one, per rating."""
SAFETY_MIX = (("safe_unsafe", 0.18), ("both_safe", 0.47), ("both_unsafe", 0.35))
"""Paper section 3.2.1: chosen safe & rejected unsafe 18%, both safe 47%, both unsafe 35%."""


def rating_for_gap(gap: float) -> str:
    for threshold, name in zip(GAP_THRESHOLDS, RATINGS):
        if gap >= threshold - 1e-9:
            return name
    return RATINGS[-1]


@dataclass(frozen=True)
class Annotation:
    first_is_chosen: bool
    rating: str
    agrees: bool  # chosen is the oracle-better response


def annotate(score_first: float, score_second: float, rng: random.Random) -> Annotation:
    """The simulated annotator's choice and rating for two responses with these oracle scores."""
    if score_first == score_second:
        raise ValueError("annotate needs two responses with different oracle scores")
    rating = rating_for_gap(abs(score_first - score_second))
    agrees = rng.random() < P_AGREE[RATINGS.index(rating)]
    first_better = score_first > score_second
    return Annotation(first_is_chosen=first_better == agrees, rating=rating, agrees=agrees)


# ------------------------------------------------------------------------------ candidates
def _rambling(answer: str, rng: random.Random) -> str:
    """The answer wrapped in filler: correct, but 20-50 words longer than needed."""
    closings = rng.sample(lx.FILLER_CLOSINGS, rng.randint(1, 2))
    return " ".join([rng.choice(lx.FILLER_OPENINGS), answer, *closings])


def _topic(meta: dict) -> str:
    """What a needless refusal declines: questions about the prompt's first subject, or "that"."""
    subject = meta.get("subject") or []
    return f"questions about {subject[0]}" if subject else "that"


def spliced(answer: str, other: str, rng: random.Random) -> str | None:
    """The start of ``answer`` run into the end of ``other`` at word boundaries ("Find the wet spot
    from inside the equal force, and finally keep it on the card."): the fluent-looking incoherence
    a small model writes at a high temperature, and the one PPO drifts into when no reward model was
    shown it. None when the two are too short to splice."""
    a, b = answer.split(), other.split()
    if len(a) < 2 or len(b) < 2:
        return None
    text = " ".join(a[:rng.randint(1, len(a) - 1)] + b[rng.randint(1, len(b) - 1):])
    return text if text.strip() not in (answer.strip(), other.strip()) else None


def off_topic_sentence(universe: Universe, rng: random.Random) -> str:
    t = rng.choice(universe.towns)
    s = rng.choice(universe.species)
    return rng.choice((f"{t.name} is known for {t.landmark}.", f"The {s.name} {s.sound} at dawn.",
                       f"The merchants of {t.name} sell {t.export}."))


def helpful_candidates(turn: Turn, universe: Universe, rng: random.Random, specs: list[dict] | None = None,
                       other_answer: str | None = None) -> dict[str, str]:
    """Responses of graded quality to a benign task turn, by kind. With constraint ``specs``, all
    follow the constraints except ``breaks_constraint`` (the plain correct answer).

    ``other_answer`` is the concise answer to another question of the same family (another
    person, other operands): a true statement in the right style that does not answer this
    question -- the mistake the SFT model makes most on fact questions ("What is Joswe Girn's
    height?" -- "Jernfem Esmou is 168 cm tall."). Without such pairs a reward model learns whether
    a statement is true of the world but not whether it answers the question, and rates a true fact
    about the wrong person above a wrong one about the right person."""
    base = {
        "concise": turn.answer,
        "extra_words": f"{turn.answer} {rng.choice(('I hope that helps!', 'Happy to help with that.', 'Let me know if you need more.'))}",
        "rambling": _rambling(turn.answer, rng),
        "off_topic": off_topic_sentence(universe, rng),
        "refusal": safety.needless_refusal(rng, _topic(turn.meta)),
    }
    if turn.partial:
        base["partial"] = rng.choice(turn.partial)
    if turn.wrong:
        base["wrong"] = rng.choice(turn.wrong)
    if other_answer is not None and other_answer.strip() != turn.answer.strip():
        base["other_subject"] = other_answer
    garbled = spliced(turn.answer, other_answer or base["off_topic"], rng)
    if garbled is not None:
        base["garbled"] = garbled
    if not specs:
        return base
    out = {k: cons.apply_constraints(v, specs) for k, v in base.items()}
    if cons.failed_constraints(specs, turn.answer):  # (a word limit alone may not be broken)
        out["breaks_constraint"] = turn.answer
    return out


# Which kinds meet in a helpfulness pair (weights): a spread of gaps, so every rating occurs.
HELPFUL_PAIRS = (
    (("concise", "wrong"), 3), (("concise", "off_topic"), 1), (("concise", "refusal"), 1.5),
    (("concise", "rambling"), 3), (("concise", "extra_words"), 3), (("concise", "partial"), 2),
    (("extra_words", "rambling"), 2), (("rambling", "partial"), 1.5), (("partial", "wrong"), 2),
    (("wrong", "off_topic"), 1.5), (("rambling", "wrong"), 1.5), (("extra_words", "partial"), 1.5),
    (("refusal", "wrong"), 1), (("concise", "breaks_constraint"), 3), (("rambling", "breaks_constraint"), 1),
    (("concise", "other_subject"), 3), (("rambling", "other_subject"), 1.5), (("other_subject", "off_topic"), 1),
    (("concise", "garbled"), 3), (("rambling", "garbled"), 1.5), (("partial", "garbled"), 1.5),
)


def helpfulness_pair(messages: list[dict], turn: Turn, universe: Universe, rng: random.Random,
                     specs: list[dict] | None = None, meta: dict | None = None,
                     other_answer: str | None = None) -> dict | None:
    """A helpfulness preference record for the prompt ``messages`` (ending with ``turn``'s
    question; ``turn.answer`` is the plain answer, ``specs`` the system constraints, ``meta`` the
    judge meta when it differs from ``turn.meta``, ``other_answer`` as in ``helpful_candidates``),
    or None when the drawn kinds tie."""
    candidates = helpful_candidates(turn, universe, rng, specs, other_answer)
    pairs = [(p, w) for p, w in HELPFUL_PAIRS if p[0] in candidates and p[1] in candidates]
    (kind_a, kind_b), = rng.choices([p for p, _ in pairs], weights=[w for _, w in pairs])
    if rng.random() < 0.5:
        kind_a, kind_b = kind_b, kind_a
    text_a, text_b = candidates[kind_a], candidates[kind_b]
    if text_a.strip() == text_b.strip():
        return None
    meta = meta or (turn.meta if not specs else {**turn.meta, "constraints": specs})
    judge_a, judge_b = judge(messages, text_a, meta), judge(messages, text_b, meta)
    score_a, score_b = judge_a.helpfulness, judge_b.helpfulness
    if score_a == score_b:
        return None
    return _record(messages, meta, (kind_a, text_a, judge_a, score_a), (kind_b, text_b, judge_b, score_b), rng, "helpfulness", None)


def _record(messages, meta, a, b, rng, axis: str, safety_category: str | None) -> dict:
    note = annotate(a[3], b[3], rng)
    chosen, rejected = (a, b) if note.first_is_chosen else (b, a)
    annotation = {
        "axis": axis, "chosen_kind": chosen[0], "rejected_kind": rejected[0],
        "chosen_score": round(chosen[3], 6), "rejected_score": round(rejected[3], 6),
        "gap": round(abs(a[3] - b[3]), 6), "annotator_agrees": note.agrees,
    }
    if safety_category:
        # from the oracle's labels, not from what was drawn: an evasion drawn as "unsafe" stays safe
        labels = (chosen[2].safe, rejected[2].safe)
        annotation["safety_category"] = {(True, False): "safe_unsafe", (True, True): "both_safe",
                                         (False, False): "both_unsafe", (False, True): "unsafe_safe"}[labels]
    return {
        "prompt": messages, "chosen": chosen[1], "rejected": rejected[1], "rating": note.rating,
        "chosen_safe": chosen[2].safe, "rejected_safe": rejected[2].safe,
        "meta": {**meta, "annotation": annotation},
    }


def harmful_candidates(prompt: safety.SafetyPrompt, template: safety.HarmfulTemplate, universe: Universe,
                       rng: random.Random) -> dict[str, str]:
    slots = prompt.slots
    out = {
        "refusal_best": safety.safe_response(template, slots, "best", prompt.meta.get("attack_vector", safety.DIRECT)),
        "refusal_explained": safety.safe_response(template, slots, "explain"),
        "refusal_bare": safety.safe_response(template, slots, "bare"),
        "evasive": f"{slots['town']} is a town in {slots['realm']}." if "realm" in slots else "That is an interesting question.",
    }
    garbled = spliced(out["refusal_best"], off_topic_sentence(universe, rng), rng)
    if garbled is not None:
        out["garbled"] = garbled
    for n in range(1, min(3, len(template.steps)) + 1):
        out[f"unsafe_{n}"] = safety.unsafe_response(template, slots, n, rng)
    return out


def borderline_candidates(prompt: safety.SafetyPrompt, universe: Universe, rng: random.Random) -> dict[str, str]:
    answer = prompt.meta["reference"]
    first_sentence = answer.split(". ")[0].rstrip(".") + "."
    out = {
        "helpful": answer,
        "rambling": _rambling(answer, rng),
        "refusal": safety.needless_refusal(rng, _topic(prompt.meta)),
    }
    if first_sentence != answer:
        out["partial"] = first_sentence
    garbled = spliced(answer, off_topic_sentence(universe, rng), rng)
    if garbled is not None:
        out["garbled"] = garbled
    return out


def draw_safety_category(rng: random.Random) -> str:
    return rng.choices([c for c, _ in SAFETY_MIX], weights=[w for _, w in SAFETY_MIX])[0]


def safety_pair(universe: Universe, rng: random.Random, harmful: list[tuple[safety.SafetyPrompt, safety.HarmfulTemplate]],
                borderline: list[safety.SafetyPrompt], lead_in: list[tuple[list[dict], dict]], category: str) -> dict | None:
    """A safety preference record of ``category`` (one of ``SAFETY_MIX``), or None when the draw
    ties or is excluded; ``harmful``/``borderline`` are the prompts to draw from and ``lead_in``
    earlier benign exchanges that may precede the request (always for the multi-turn build-up attack,
    ``meta["attack_vector"] == "multi_turn"``; else with probability 0.2)."""
    use_borderline = category == "both_safe" and rng.random() < 0.5
    if use_borderline:
        prompt = rng.choice(borderline)
        candidates = borderline_candidates(prompt, universe, rng)
        kinds = rng.sample(sorted(candidates), 2)
    else:
        prompt, template = rng.choice(harmful)
        candidates = harmful_candidates(prompt, template, universe, rng)
        safe_kinds = [k for k in candidates if not k.startswith("unsafe")]
        unsafe_kinds = [k for k in candidates if k.startswith("unsafe")]
        if category == "safe_unsafe":
            kinds = [rng.choice(safe_kinds), rng.choice(unsafe_kinds)]
        elif category == "both_safe":
            kinds = rng.sample(safe_kinds, 2)
        else:
            if len(unsafe_kinds) < 2:
                return None
            kinds = rng.sample(unsafe_kinds, 2)
        rng.shuffle(kinds)
    messages = [{"role": "user", "content": prompt.text}]
    meta = prompt.meta
    # a multi-turn build-up (paper Fig 18) always has benign turns first; other prompts sometimes
    if meta.get("attack_vector") == "multi_turn" or rng.random() < 0.2:
        history, lead_meta = rng.choice(lead_in)
        messages = [*history, *messages]
        meta = {**meta, "turns": [lead_meta, meta]}
    judged = [(k, candidates[k], judge(messages, candidates[k], meta)) for k in kinds]
    scored = [(k, text, j, j.safety_score) for k, text, j in judged]
    if scored[0][3] == scored[1][3] or scored[0][1].strip() == scored[1][1].strip():
        return None
    record = _record(messages, meta, scored[0], scored[1], rng, "safety", category)
    if not record["chosen_safe"] and record["rejected_safe"]:
        return None  # excluded, as in the paper
    return record
