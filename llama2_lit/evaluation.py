"""Evaluation on the toy world: greedy answers judged by the oracle, summarised per suite.

The suites mirror what the paper measures with humans (sections 3.4 and 4.4), with the oracle
(``llama2_lit.data.oracle.judge``) as the judge:

* **helpfulness** — mean oracle helpfulness in [0, 1] and the share of exactly correct answers,
  per prompt category (task, harmful, borderline);
* **violation rate** — share of unsafe answers (paper 4.4: a violation is a rating of 1 or 2);
* **false refusals** — share of refusals on benign prompts that merely look risky (paper Fig 33's
  borderline set); refusing harmful prompts is what we want, so refusals are reported per category;
* **constraint adherence by turn and type** — a dialog under a system instruction answered turn
  after turn with the model's own answers as context (paper section 3.3, Table 30: the share of
  replies that still follow the instruction at turns 2, 4, 6, ...);
* **violation rate by attack vector** — the same violation rate, per ``meta["attack_vector"]`` of
  the prompts (paper section 4.2.1's attack vectors; "direct" for plain requests);
* **best-of-K** — the expected oracle score of the best of K samples, with the oracle as the
  picker: the room rejection sampling has (paper section 3.2.3, Fig 7).

Stage callbacks (SFT's ``OracleHelpfulness``), the notebooks, ``llama2-lit evaluate``, the
pipeline's report and ``llama2-lit world check`` all use these functions, so a number means the
same thing wherever it appears.

The evaluation suite (``evaluate_checkpoints``, the ``llama2-lit evaluate`` verb) adds, per checkpoint:

* **perplexity** on the held-out pretraining text (``corpus_perplexity``);
* the oracle's scores on the held-out suites of ``evaluation_suites`` (tasks, harmful prompts for
  the violation rate, borderline prompts for the false-refusal rate), with the standard error of
  each mean as its spread, and the violation rate per attack vector of the harmful suite;
* the **reward models' scores** of the answers (the safety RM's on the harmful suite, the
  helpfulness RM's on the held-out tasks: paper Fig 14's distributions);
* **reward-model accuracy by rating** (Table 8's layout, ``llama2_lit.reward_metrics``);
* the **pairwise win rate** of each checkpoint against the first, with ties, judged by the oracle
  and by the reward models (the paper's Fig 1 and Fig 12 compare models this way, with GPT-4 and
  human judges).

Decoding defaults to the paper's automatic safety evaluation (section 4.1: temperature 0.1, top-p
0.9); ``Decoding`` makes it configurable. The answers the win rates compare are the suites'
answers, so every checkpoint answers every prompt once.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llama2_lit.model import Transformer
from llama2_lit.tokenizer import Tokenizer


def generate_texts(model: Transformer, tokenizer: Tokenizer, prompts: list[list[dict]], *, max_new_tokens: int = 64,
                   batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                   seeds: list[int] | None = None) -> list[str]:
    """Answers of ``model`` to chat prompts (messages ending with a user turn), in order.

    Prompts are decoded in batches of similar length (less padding); greedy by default. With
    ``temperature > 0`` each row samples with its own seed from ``seeds`` (one per prompt), so a
    row's answer does not depend on which rows share its batch."""
    from llama2_lit.chat import encode_prompt
    from llama2_lit.generation import generate
    from llama2_lit.parallelize import prepare_for_inference_mode

    if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError(f"sampling needs one seed per prompt: got {None if seeds is None else len(seeds)} "
                         f"seeds for {len(prompts)} prompts")
    room = model.config.max_seq_len - max_new_tokens
    encoded = [encode_prompt(tokenizer, messages, max_len=room) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    prepare_for_inference_mode(model, tokenizer.bos_id)  # generate() runs in inference mode
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out = generate(model, [encoded[i] for i in rows], max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, eos_id=tokenizer.eos_id,
                       generator=[seeds[i] for i in rows] if temperature > 0 else None)
        for row, length in enumerate(out.response_lengths.tolist()):
            ids = out.response_ids[row, :length].tolist()
            if out.eos_emitted[row]:
                ids = ids[:-1]
            texts[rows[row]] = tokenizer.decode(ids)
    return texts


def oracle_answers(model: Transformer, tokenizer: Tokenizer, records: list[dict], *, max_new_tokens: int = 64,
                   batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Answers of ``model`` to the prompts of ``records`` (greedy unless ``temperature`` > 0),
    judged by the toy world's oracle.

    ``records`` are ``prompts`` records (messages ending with the user turn) or ``chat`` records
    (the final assistant turn is dropped: it is the reference answer). Returns one dict per
    record: ``messages`` (the prompt), ``response`` (text), ``meta`` (the record's),
    ``judgement`` (``oracle.Judgement``).
    Every rank of a sharded model must call this with the same records (FSDP gathers weights
    collectively, so all ranks decode in lockstep).
    """
    from llama2_lit.data.oracle import judge

    prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in records]
    # One seed per prompt: an answer does not depend on its batch neighbours.
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           temperature=temperature, top_p=top_p,
                           seeds=[seed * 1_000_003 + i for i in range(len(prompts))])
    return [{"messages": messages, "response": response, "meta": record.get("meta") or {},
             "judgement": judge(messages, response, record.get("meta"))}
            for messages, response, record in zip(prompts, texts, records)]


def helpfulness_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean helpfulness (overall and per category) and violation rate of ``oracle_answers`` output."""
    judgements = [r["judgement"] for r in results]
    summary = {"helpfulness": _mean(j.helpfulness for j in judgements),
               "helpfulness_se": _standard_error([j.helpfulness for j in judgements]),
               "violation": _mean(j.violation for j in judgements)}
    for category in sorted({j.category for j in judgements}):
        summary[f"helpfulness_{category}"] = _mean(j.helpfulness for j in judgements if j.category == category)
    return summary


def suite_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Everything the report shows for one suite: helpfulness, accuracy, violations, refusals."""
    judgements = [r["judgement"] for r in results]
    summary = {"n": float(len(judgements)), **helpfulness_summary(results),
               "violation_se": _standard_error([float(j.violation) for j in judgements]),
               "refusal": _mean(j.refusal for j in judgements),
               "refusal_se": _standard_error([float(j.refusal) for j in judgements])}
    graded = [j.correct for j in judgements if j.correct is not None]
    if graded:
        summary["accuracy"] = _mean(graded)
    return summary


def rate_by(results: list[dict[str, Any]], key: str, value: str = "violation") -> dict[str, float]:
    """The mean of a judgement field (``violation``, ``refusal``, ``helpfulness``, ...) of
    ``oracle_answers`` output per value of the prompts' ``meta[key]`` (e.g. ``attack_vector``),
    with ``"all"`` over every result."""
    groups: dict[str, list[float]] = {}
    for r in results:
        group = str(r["meta"].get(key))
        groups.setdefault(group, []).append(float(getattr(r["judgement"], value)))
    out = {group: _mean(values) for group, values in sorted(groups.items())}
    out["all"] = _mean(float(getattr(r["judgement"], value)) for r in results)
    return out


def count_by(results: list[dict[str, Any]], key: str) -> dict[str, int]:
    """How many of ``oracle_answers`` output fall in each value of the prompts' ``meta[key]`` (the
    groups of ``rate_by``), with ``"all"``."""
    counts: dict[str, int] = {}
    for r in results:
        group = str(r["meta"].get(key))
        counts[group] = counts.get(group, 0) + 1
    return {**dict(sorted(counts.items())), "all": len(results)}


def constraint_rollouts(model: Transformer, tokenizer: Tokenizer, records: list[dict], *, max_turns: int | None = None,
                        max_new_tokens: int = 48, batch_size: int = 16) -> list[list[dict[str, Any]]]:
    """Dialogs under a system instruction, answered turn after turn by ``model`` with its own
    answers as context (the paper's multi-turn evaluation, section 3.3 and Table 30).

    ``records`` are ``gatt_eval`` prompts: the system message and the first user turn in
    ``messages``, every user turn with its judge meta in ``meta["turns"]``, the constraint specs in
    ``meta["constraints"]``. The instruction stays where the chat format puts it (the first turn
    only). All dialogs advance one turn per batch of generations. Returns, per dialog, one dict
    per turn: ``response``, ``ok`` (constraint type -> followed; never by an empty reply),
    ``judgement`` (the oracle's)."""
    from llama2_lit.data import constraints as cons
    from llama2_lit.data.oracle import judge

    histories = [[m for m in r["messages"] if m["role"] == "system"] for r in records]
    n_turns = [len(r["meta"]["turns"]) if max_turns is None else min(max_turns, len(r["meta"]["turns"])) for r in records]
    out: list[list[dict[str, Any]]] = [[] for _ in records]
    for turn in range(max(n_turns, default=0)):
        active = [i for i in range(len(records)) if turn < n_turns[i]]
        for i in active:
            histories[i].append({"role": "user", "content": records[i]["meta"]["turns"][turn]["user"]})
        texts = generate_texts(model, tokenizer, [histories[i] for i in active], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
        for i, text in zip(active, texts):
            specs = records[i]["meta"]["constraints"]
            turn_meta = {**records[i]["meta"]["turns"][turn]["meta"], "constraints": specs}
            # an empty reply follows no instruction (it would pass "capital letters" and a word limit)
            out[i].append({"response": text, "ok": {s["type"]: bool(text.strip()) and cons.check_constraint(s, text)
                                                    for s in specs},
                           "judgement": judge(histories[i], text, turn_meta)})
            histories[i].append({"role": "assistant", "content": text or "..."})
    return out


def adherence_by_turn(rollouts: list[list[dict[str, Any]]],
                      types: tuple[str, ...] | None = None) -> dict[str, dict[int, float]]:
    """``{constraint type: {turn (1-based): share of replies that follow it}}`` of
    ``constraint_rollouts`` output, with ``"all"`` (every constraint of the dialog followed).

    With ``types``, only constraints of those types count: ``"all"`` is then every one of them
    followed, over the dialogs that carry at least one (e.g. the trained types, leaving a held-out
    type to its own zero-shot row)."""
    counts: dict[str, dict[int, list[float]]] = {}
    for dialog in rollouts:
        for turn, step in enumerate(dialog, start=1):
            ok = {kind: value for kind, value in step["ok"].items() if types is None or kind in types}
            if types is not None and not ok:
                continue
            for kind, value in [*ok.items(), ("all", all(ok.values()))]:
                counts.setdefault(kind, {}).setdefault(turn, []).append(float(value))
    return {kind: {turn: _mean(v) for turn, v in sorted(turns.items())} for kind, turns in sorted(counts.items())}


def best_of_k(model: Transformer, tokenizer: Tokenizer, records: list[dict], *, ks: tuple[int, ...] = (1, 2, 4, 8, 16),
              temperature: float = 0.6, top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 16,
              seed: int = 0, score: str = "helpfulness") -> dict[int, float]:
    """Mean over prompts of the expected best oracle ``score`` among K samples at ``temperature``,
    the oracle as the picker (paper section 3.2.3, Fig 7: the room rejection sampling has).
    ``max(ks)`` samples per prompt, each row with its own seed (``seed`` + row index)."""
    from llama2_lit.data.oracle import judge

    n = max(ks)
    prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in records]
    repeated = [p for p in prompts for _ in range(n)]
    texts = generate_texts(model, tokenizer, repeated, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           temperature=temperature, top_p=top_p, seeds=[seed + i for i in range(len(repeated))])
    per_prompt = []
    for index, record in enumerate(records):
        judged = [judge(prompts[index], t, record.get("meta")) for t in texts[index * n:(index + 1) * n]]
        per_prompt.append([j.safety_score if score == "safety_score" else getattr(j, score) for j in judged])
    from llama2_lit.rlhf.best_of_k import expected_max_of_k

    # Unbiased over all subsets of K of the max(ks) samples (llama2_lit.rlhf.best_of_k).
    return {k: float(expected_max_of_k(torch.tensor(per_prompt, dtype=torch.float64), k).mean()) for k in ks}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def _standard_error(values: list[float]) -> float:
    """Standard error of the mean (the spread the report shows next to a mean); NaN below 2 values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)



# ------------------------------------------------------------------------------------ the suite
@dataclass(frozen=True)
class Decoding:
    """How the evaluated models answer. The default is the paper's automatic safety evaluation
    (section 4.1: "temperature 0.1 and top-p 0.9"); ``temperature=0`` is greedy decoding."""

    temperature: float = 0.1
    top_p: float = 0.9
    max_new_tokens: int = 64
    seed: int = 0


SUITES = ("tasks (held-out)", "tasks (seen)", "harmful (held-out)", "borderline (held-out)")
"""The prompt sets (``evaluation_suites``): helpfulness and accuracy on tasks, the violation rate on
harmful prompts, the false-refusal rate (``refusal``) on borderline prompts."""
HARMFUL = SUITES[2]


def evaluation_suites(world: str | Path, n: int, seed: int = 0) -> dict[str, list[dict]]:
    """The held-out (and one seen) prompt sets, ``n`` prompts each, fixed by ``seed``:

    * ``tasks (held-out)`` — ``sft_eval``: questions about people known only from prose, arithmetic
      on operand pairs that appear nowhere in training, unseen words to transform (generalisation);
    * ``tasks (seen)`` — task prompts from ``sft_train`` (what SFT was taught directly);
    * ``harmful (held-out)`` — ``safety_eval``: a safe answer (refusal with help) is what scores;
    * ``borderline (held-out)`` — ``borderline_eval``: benign prompts that look risky; refusing
      them is a false refusal (paper Fig 33).
    """
    from llama2_lit.data.records import load_records

    world = Path(world)
    rng = random.Random(seed)

    def sample(records: list[dict]) -> list[dict]:
        return rng.sample(records, min(n, len(records)))

    def tasks(records: list[dict]) -> list[dict]:
        return [r for r in records if r.get("meta", {}).get("category") == "task"]

    return {
        SUITES[0]: sample(tasks(load_records(world / "sft_eval.jsonl", "chat"))),
        SUITES[1]: sample(tasks(load_records(world / "sft_train.jsonl", "chat"))),
        SUITES[2]: sample(load_records(world / "safety_eval.jsonl", "prompts")),
        SUITES[3]: sample(load_records(world / "borderline_eval.jsonl", "prompts")),
    }


def corpus_perplexity(model: Transformer, tokenizer: Tokenizer, path: str | Path, *, max_tokens: int = 32_768,
                      seq_len: int | None = None, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on the first ``max_tokens`` tokens of a pretraining text file (its
    documents BOS-prefixed and EOS-terminated, concatenated and cut into ``seq_len`` windows, as
    pretraining reads them)."""
    import torch
    import torch.nn.functional as F

    from llama2_lit.data.datamodules.pretrain import read_text_documents

    seq_len = seq_len or model.config.max_seq_len
    stream: list[int] = []
    for document in read_text_documents(path):
        stream += tokenizer.encode(document, bos=True, eos=True)
        if len(stream) > max_tokens:
            break
    stream = stream[: max_tokens + 1]
    windows = [stream[i:i + seq_len + 1] for i in range(0, len(stream) - 1, seq_len)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError(f"{path}: no text to compute a perplexity on")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            width = max(len(w) for w in chunk)
            ids = torch.zeros(len(chunk), width - 1, dtype=torch.long)
            labels = torch.full((len(chunk), width - 1), -100, dtype=torch.long)
            for row, window in enumerate(chunk):
                ids[row, :len(window) - 1] = torch.tensor(window[:-1])
                labels[row, :len(window) - 1] = torch.tensor(window[1:])
            logits = model(ids.to(device)).float()
            total += float(F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=-100,
                                           reduction="sum"))
            count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / count)


def win_rate(outcomes: list[int]) -> dict[str, float]:
    """Win, tie and loss shares of +1 / 0 / -1 outcomes (the paper's Fig 1 and Fig 12 bars)."""
    n = len(outcomes)
    if n == 0:
        return {"n": 0.0, "win": float("nan"), "tie": float("nan"), "loss": float("nan")}
    return {"n": float(n), "win": outcomes.count(1) / n, "tie": outcomes.count(0) / n, "loss": outcomes.count(-1) / n}


def oracle_outcomes(answers_a: list[dict[str, Any]], answers_b: list[dict[str, Any]]) -> list[int]:
    """+1 where the oracle's helpfulness of A's answer beats B's, -1 where it is lower, 0 for a tie
    (same prompts, same order, as ``oracle_answers`` returns them)."""
    _check_same_prompts(answers_a, answers_b)
    return [(a["judgement"].helpfulness > b["judgement"].helpfulness) - (a["judgement"].helpfulness <
                                                                        b["judgement"].helpfulness)
            for a, b in zip(answers_a, answers_b)]


def reward_outcomes(answers_a: list[dict[str, Any]], answers_b: list[dict[str, Any]], tokenizer: Tokenizer,
                    helpfulness_rm: Transformer, safety_rm: Transformer | None, *, safety_tags: list[bool],
                    tie_margin: float = 0.02) -> list[int]:
    """+1 / 0 / -1 per prompt by the reward models: the safety-aware reward R_c of section 3.2.3
    (``rlhf.rewards.safety_first_reward``) of each answer on the sigmoid scale; a gap below
    ``tie_margin`` (or the same text) is a tie. The paper does not define a reward-model tie; a
    small margin keeps the noise of a near-equal score out of the win column."""
    import torch

    from llama2_lit.reward_metrics import score_responses
    from llama2_lit.rlhf.rewards import safety_first_reward

    _check_same_prompts(answers_a, answers_b)
    prompts = [a["messages"] for a in answers_a]
    tags = torch.tensor(safety_tags, dtype=torch.bool)

    def reward(answers: list[dict[str, Any]]) -> torch.Tensor:
        texts = [a["response"] for a in answers]
        r_h = torch.sigmoid(score_responses(helpfulness_rm, tokenizer, prompts, texts))
        if safety_rm is None:
            return r_h
        r_s = torch.sigmoid(score_responses(safety_rm, tokenizer, prompts, texts))
        return safety_first_reward(r_h, r_s, tags)

    r_a, r_b = reward(answers_a), reward(answers_b)
    outcomes = []
    for a, b, ra, rb in zip(answers_a, answers_b, r_a.tolist(), r_b.tolist()):
        same = a["response"].strip() == b["response"].strip()
        outcomes.append(0 if same or abs(ra - rb) < tie_margin else (1 if ra > rb else -1))
    return outcomes


def _check_same_prompts(answers_a: list[dict[str, Any]], answers_b: list[dict[str, Any]]) -> None:
    if len(answers_a) != len(answers_b) or any(a["messages"] != b["messages"] for a, b in zip(answers_a, answers_b)):
        raise ValueError("a win rate compares answers to the same prompts, in the same order")


def reward_model_accuracy(reward_model: Transformer, tokenizer: Tokenizer, records: list[dict], *,
                          by_kind: bool = False) -> dict[str, Any]:
    """Accuracy per rating and overall (Table 8's row) of a reward model on ``preference`` records,
    with the number of pairs; ``by_kind``: also ``"kinds"``, the accuracy per kind of pair
    (``reward_metrics.pair_kind_accuracy``)."""
    from llama2_lit.reward_metrics import evaluate_pairs, pair_kind_accuracy, rating_table, score_pairs

    scores = score_pairs(reward_model, tokenizer, records)
    metrics = evaluate_pairs(reward_model, tokenizer, records, scores=scores)
    row: dict[str, Any] = {**rating_table(metrics), "pairs": metrics["pairs"]}
    if by_kind:
        row["kinds"] = pair_kind_accuracy(records, *scores)
    return row


def evaluate_checkpoints(checkpoints: dict[str, str | Path], *, world: str | Path, tokenizer_path: str | Path,
                         prompts_per_suite: int = 100, decoding: Decoding = Decoding(),
                         reward_models: dict[str, str | Path] | None = None,
                         preference_files: dict[str, str | Path] | None = None,
                         perplexity_tokens: int = 32_768, baseline: str | None = None,
                         log: Any = print) -> dict[str, Any]:
    """The whole suite (module docstring), as a JSON-ready dict.

    ``checkpoints``: name -> policy checkpoint; every other one's win rate is taken against
    ``baseline`` (default: the first).
    ``reward_models``: ``helpfulness`` and/or ``safety`` -> reward-model checkpoint; they judge the
    win rates, score every model's answers (``reward_scores``: the safety RM on the harmful suite, the
    helpfulness RM on the held-out tasks) and are scored on ``preference_files`` (name ->
    ``preference`` file).
    """
    from llama2_lit.checkpoints import load_model
    from llama2_lit.data.records import load_records
    from llama2_lit.reward_metrics import load_reward_model, score_responses

    tokenizer = Tokenizer(tokenizer_path)
    suites = evaluation_suites(world, prompts_per_suite, seed=decoding.seed)
    results: dict[str, Any] = {"decoding": asdict(decoding), "prompts_per_suite": prompts_per_suite,
                               "models": {}, "samples": {}, "win_rates": {}, "reward_models": {}}
    answers: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, checkpoint in checkpoints.items():
        model = load_model(checkpoint).eval()
        scores: dict[str, Any] = {"checkpoint": str(checkpoint),
                                  "perplexity": corpus_perplexity(model, tokenizer, Path(world) / "corpus_val.txt",
                                                                  max_tokens=perplexity_tokens)}
        answers[name] = {}
        for suite, records in suites.items():
            answers[name][suite] = oracle_answers(model, tokenizer, records, max_new_tokens=decoding.max_new_tokens,
                                                  temperature=decoding.temperature, top_p=decoding.top_p,
                                                  seed=decoding.seed)
            scores[suite] = suite_summary(answers[name][suite])
        # Paper 4.2.1's attack vectors ("direct": a plain request), one violation rate each.
        scores["violation_by_vector"] = rate_by(answers[name][HARMFUL], "attack_vector")
        scores["harmful_n_by_vector"] = count_by(answers[name][HARMFUL], "attack_vector")
        results["models"][name] = scores
        results["samples"][name] = {suite: [a["response"] for a in answers[name][suite][:3]] for suite in suites}
        log(f"[evaluate] {name}: ppl {scores['perplexity']:.2f}  " + "  ".join(
            f"{suite} h {scores[suite]['helpfulness']:.3f} v {scores[suite]['violation']:.2f} "
            f"r {scores[suite]['refusal']:.2f}" for suite in suites))
        del model

    rms = {kind: load_reward_model(path) for kind, path in (reward_models or {}).items()}
    # The reward models' own view of every model's answers (paper Fig 14: the safety RM's scores of
    # answers to adversarial prompts, the helpfulness RM's of answers to helpfulness prompts), on the
    # sigmoid scale.
    results["reward_scores"] = {name: {} for name in checkpoints} if rms else {}
    for kind, suite in (("safety", HARMFUL), ("helpfulness", SUITES[0])):
        if kind in rms:
            for name in checkpoints:
                prompts = [a["messages"] for a in answers[name][suite]]
                texts = [a["response"] for a in answers[name][suite]]
                results["reward_scores"][name][kind] = torch.sigmoid(
                    score_responses(rms[kind], tokenizer, prompts, texts)).tolist()
    baseline = baseline or next(iter(checkpoints))
    if baseline not in checkpoints:
        raise ValueError(f"the win-rate baseline {baseline!r} is not one of the checkpoints {list(checkpoints)}")
    for name in [n for n in checkpoints if n != baseline]:
        a = [x for suite in suites for x in answers[name][suite]]
        b = [x for suite in suites for x in answers[baseline][suite]]
        entry = {"baseline": baseline, "oracle": win_rate(oracle_outcomes(a, b))}
        if "helpfulness" in rms:
            tags = [bool(r.get("is_safety", r.get("meta", {}).get("category") == "harmful"))
                    for suite in suites for r in suites[suite]]
            entry["reward_model"] = win_rate(reward_outcomes(a, b, tokenizer, rms["helpfulness"], rms.get("safety"),
                                                             safety_tags=tags))
        results["win_rates"][name] = entry
    for kind, model in rms.items():
        results["reward_models"][kind] = {"checkpoint": str(reward_models[kind])} | {
            label: reward_model_accuracy(model, tokenizer, load_records(path, "preference"))
            for label, path in (preference_files or {}).items()}
    return results


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a markdown table: ``-`` when missing or NaN."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def win_rate_rows(win_rates: dict[str, Any], *, with_baseline: bool = True) -> list[str]:
    """Markdown rows of win / tie / loss per model and judge (oracle, reward model)."""
    lines = []
    for name, entry in win_rates.items():
        for judge_name in ("oracle", "reward_model"):
            if judge_name in entry:
                w = entry[judge_name]
                against = f" {entry['baseline']} |" if with_baseline else ""
                lines.append(f"| {name} |{against} {judge_name.replace('_', ' ')} | {fmt(w['win'])} | {fmt(w['tie'])} | "
                             f"{fmt(w['loss'])} |")
    return lines


def adversarial_violation(model: dict[str, Any]) -> float:
    """The violation rate over the harmful suite's prompts wrapped in an attack vector (every vector
    but ``direct``), from a model's ``violation_by_vector`` and ``harmful_n_by_vector``."""
    from llama2_lit.data.safety import DIRECT

    counts = {v: n for v, n in model["harmful_n_by_vector"].items() if v not in ("all", DIRECT)}
    total = sum(counts.values())
    return sum(model["violation_by_vector"][v] * n for v, n in counts.items()) / total if total else float("nan")


def attack_vector_rows(models: dict[str, Any]) -> list[str]:
    """A markdown table of each model's violation rate per attack vector of the harmful suite (paper
    4.2.1; the vector held out of every training file marked), and over all adversarial prompts."""
    from llama2_lit.data.safety import ATTACK_VECTORS, DIRECT, HELD_OUT_ATTACK_VECTORS

    counts = next(iter(models.values()))["harmful_n_by_vector"]  # every model answers the same prompts
    vectors = [DIRECT, *ATTACK_VECTORS]  # a vector absent from the suite shows n=0 and no rate

    def name(vector: str) -> str:
        return vector.replace("_", " ") + (", held out" if vector in HELD_OUT_ATTACK_VECTORS else "")

    lines = ["| model | " + " | ".join(f"{name(v)} (n={counts.get(v, 0)})" for v in vectors) + " | adversarial, all |",
             "|---|" + "---|" * (len(vectors) + 1)]
    for label, model in models.items():
        lines.append(f"| {label} | " + " | ".join(fmt(model["violation_by_vector"].get(v)) for v in vectors) +
                     f" | {fmt(adversarial_violation(model))} |")
    return lines


def results_markdown(results: dict[str, Any]) -> str:
    """The suite's results as markdown tables (oracle scores per model and suite; win rates;
    reward-model accuracy by rating)."""
    from llama2_lit.data.records import RATINGS

    d = results["decoding"]
    lines = [f"Decoding: temperature {d['temperature']:g}, top-p {d['top_p']:g}, at most {d['max_new_tokens']} "
             f"new tokens; {results['prompts_per_suite']} prompts per suite.", "",
             "| model | perplexity | tasks (held-out) helpfulness | accuracy | tasks (seen) helpfulness | "
             "violation (harmful) | false refusal (borderline) |", "|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        held, seen, harmful, border = (m[s] for s in SUITES)
        lines.append(f"| {name} | {fmt(m['perplexity'], 2)} | {fmt(held['helpfulness'])} ± "
                     f"{fmt(held['helpfulness_se'])} | {fmt(held.get('accuracy'))} | {fmt(seen['helpfulness'])} | "
                     f"{fmt(harmful['violation'])} | {fmt(border['refusal'])} |")
    if all("violation_by_vector" in m for m in results["models"].values()) and results["models"]:
        lines += ["", "Violation rate on the harmful prompts by attack vector:", ""]
        lines += attack_vector_rows(results["models"])
    if results["win_rates"]:
        lines += ["", "| model | against | judge | win | tie | loss |", "|---|---|---|---|---|---|"]
        lines += win_rate_rows(results["win_rates"])
    if results["reward_models"]:
        lines += ["", "| reward model | test set | pairs | " + " | ".join(RATINGS) + " | avg |",
                  "|---|---|---|" + "---|" * (len(RATINGS) + 1)]
        for kind, entry in results["reward_models"].items():
            for label, row in entry.items():
                if label != "checkpoint":
                    lines.append(f"| {kind} | {label} | {int(row['pairs'])} | " +
                                 " | ".join(fmt(row[r]) for r in RATINGS) + f" | {fmt(row['avg'])} |")
    return "\n".join(lines) + "\n"
