"""Evaluation on the toy world: greedy answers judged by the oracle, summarised per suite.

The suites mirror what the paper measures with humans (sections 3.4 and 4.4), with the oracle
(``llama2_lit.data.oracle.judge``) as the judge:

* **helpfulness** — mean oracle helpfulness in [0, 1] and the share of exactly correct answers,
  per prompt category (task, harmful, borderline);
* **violation rate** — share of unsafe answers (paper 4.4: a violation is a rating of 1 or 2);
* **false refusals** — share of refusals on benign prompts that merely look risky (paper Fig 33's
  borderline set); refusing harmful prompts is what we want, so refusals are reported per category.

* **constraint adherence by turn and type** — a dialog under a system instruction answered turn
  after turn with the model's own answers as context (paper section 3.3, Table 30: the share of
  replies that still follow the instruction at turns 2, 4, 6, ...);
* **violation rate by attack vector** — the same violation rate, per ``meta["attack_vector"]`` of
  the prompts (paper section 4.2.1's attack vectors; "direct" for plain requests);
* **best-of-K** — the expected oracle score of the best of K samples, with the oracle as the
  picker: the room rejection sampling has (paper section 3.2.3, Fig 7).

Stage callbacks (SFT's ``OracleHelpfulness``), the notebooks, the pipeline's report and
``llama2-lit world check`` all use these functions, so a number means the same thing wherever it
appears.
"""

from __future__ import annotations

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
                   batch_size: int = 16) -> list[dict[str, Any]]:
    """Greedy answers of ``model`` to the prompts of ``records``, judged by the toy world's oracle.

    ``records`` are ``prompts`` records (messages ending with the user turn) or ``chat`` records
    (the final assistant turn is dropped: it is the reference answer). Returns one dict per
    record: ``messages`` (the prompt), ``response`` (text), ``meta`` (the record's),
    ``judgement`` (``oracle.Judgement``).
    Every rank of a sharded model must call this with the same records (FSDP gathers weights
    collectively, so all ranks decode in lockstep).
    """
    from llama2_lit.data.oracle import judge

    prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in records]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{"messages": messages, "response": response, "meta": record.get("meta") or {},
             "judgement": judge(messages, response, record.get("meta"))}
            for messages, response, record in zip(prompts, texts, records)]


def helpfulness_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean helpfulness (overall and per category) and violation rate of ``oracle_answers`` output."""
    judgements = [r["judgement"] for r in results]
    summary = {"helpfulness": _mean(j.helpfulness for j in judgements),
               "violation": _mean(j.violation for j in judgements)}
    for category in sorted({j.category for j in judgements}):
        summary[f"helpfulness_{category}"] = _mean(j.helpfulness for j in judgements if j.category == category)
    return summary


def suite_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Everything the report shows for one suite: helpfulness, accuracy, violations, refusals."""
    judgements = [r["judgement"] for r in results]
    summary = {"n": float(len(judgements)), **helpfulness_summary(results),
               "refusal": _mean(j.refusal for j in judgements)}
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


def adherence_by_turn(rollouts: list[list[dict[str, Any]]]) -> dict[str, dict[int, float]]:
    """``{constraint type: {turn (1-based): share of replies that follow it}}`` of
    ``constraint_rollouts`` output, with ``"all"`` (every constraint of the dialog followed)."""
    counts: dict[str, dict[int, list[float]]] = {}
    for dialog in rollouts:
        for turn, step in enumerate(dialog, start=1):
            for kind, ok in [*step["ok"].items(), ("all", all(step["ok"].values()))]:
                counts.setdefault(kind, {}).setdefault(turn, []).append(float(ok))
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
