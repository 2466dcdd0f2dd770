"""Does the toy world leave every RLHF stage room to show? Measured on one checkpoint.

Each stage after SFT has a precondition on the model it starts from:

* Ghost Attention (paper section 3.3) needs a model that follows a system instruction in the
  turn it is given (first-turn adherence) and forgets it later on (adherence at turns 2, 4, 6 is
  the baseline of paper Table 30); a held-out constraint type is the zero-shot test of Fig 28;
* safety RLHF and context distillation (section 4.2) need violations to lower: on direct harmful
  requests few, on requests wrapped in an attack vector (section 4.2.1) some, per vector, the
  held-out vector included; and few false refusals on borderline prompts (Fig 33);
* rejection sampling (section 3.2.3, Fig 7) needs headroom: the best of K samples, picked by the
  oracle, must beat one sample;
* and knowledge: task accuracy on held-out and seen prompts.

``world_check(model, tokenizer, world)`` measures all of it with the oracle as the judge and
``format_world_check`` prints it as a table; ``llama2-lit world check CKPT`` is the command.
Generation is the slow part: every suite decodes in batches (``evaluation.generate_texts``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from llama2_lit.evaluation import adherence_by_turn, best_of_k, constraint_rollouts, oracle_answers, rate_by, suite_summary

REPORTED_TURNS = (1, 2, 4, 6)
"""Turns at which constraint adherence is shown (paper Table 30 reports 2, 4, 6, 20)."""


def _sample(records: list[dict], n: int | None, rng: random.Random) -> list[dict]:
    return records if n is None or n >= len(records) else rng.sample(records, n)


def world_check(model, tokenizer, world: str | Path, *, n_gatt: int | None = 96, n_safety: int | None = None,
                n_borderline: int | None = None, n_best_of: int = 48, n_tasks: int = 100,
                ks: tuple[int, ...] = (1, 2, 4, 8, 16), temperatures: tuple[float, ...] = (0.6, 1.0, 1.4),
                max_new_tokens: int = 64,
                batch_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Every precondition, measured on ``model`` (a ``Transformer``) over the world's eval files.

    ``n_*`` bound the prompts per suite (None: the whole file); the same ``seed`` picks the same
    prompts. Returns a JSON-able dict (``format_world_check`` prints it)."""
    from llama2_lit.data import constraints as cons
    from llama2_lit.data import safety
    from llama2_lit.data.records import load_records

    world = Path(world)
    rng = random.Random(seed)
    seconds: dict[str, float] = {}
    out: dict[str, Any] = {"held_out": {"constraint_types": list(cons.HELD_OUT_CONSTRAINT_TYPES),
                                        "attack_vectors": list(safety.HELD_OUT_ATTACK_VECTORS)}}

    start = time.time()
    gatt = _sample(load_records(world / "gatt_eval.jsonl", "prompts"), n_gatt, rng)
    rollouts = constraint_rollouts(model, tokenizer, gatt, max_new_tokens=min(max_new_tokens, 48), batch_size=batch_size)
    out["adherence"] = {kind: {str(t): v for t, v in turns.items()} for kind, turns in adherence_by_turn(rollouts).items()}
    out["adherence_n"] = {kind: sum(kind in {s["type"] for s in r["meta"]["constraints"]} for r in gatt)
                          for kind in cons.CONSTRAINT_TYPES}
    out["adherence_n"]["all"] = len(gatt)
    out["gatt_samples"] = [{"system": r["messages"][0]["content"], "turns": [s["response"] for s in dialog[:2]]}
                           for r, dialog in zip(gatt[:3], rollouts[:3])]
    seconds["constraints"] = time.time() - start

    start = time.time()
    harmful = _sample(load_records(world / "safety_eval.jsonl", "prompts"), n_safety, rng)
    results = oracle_answers(model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out["violation_by_vector"] = rate_by(results, "attack_vector", "violation")
    out["refusal_by_vector"] = rate_by(results, "attack_vector", "refusal")
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r["meta"].get("attack_vector"))] = counts.get(str(r["meta"].get("attack_vector")), 0) + 1
    out["safety_n_by_vector"] = {**dict(sorted(counts.items())), "all": len(results)}
    adversarial = [r for r in results if r["meta"].get("attack_vector") != safety.DIRECT]
    out["violation_adversarial"] = suite_summary(adversarial)["violation"] if adversarial else float("nan")
    out["safety_samples"] = [{"vector": r["meta"].get("attack_vector"), "prompt": r["messages"][-1]["content"],
                              "response": r["response"], "violation": r["judgement"].violation}
                             for r in results if r["judgement"].violation][:4]
    seconds["safety"] = time.time() - start

    start = time.time()
    borderline = _sample(load_records(world / "borderline_eval.jsonl", "prompts"), n_borderline, rng)
    border_results = oracle_answers(model, tokenizer, borderline, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out["false_refusal"] = suite_summary(border_results)["refusal"]
    # A small model refuses or answers a template as a whole: the rate moves in steps of one template.
    by_template = rate_by(border_results, "template", "refusal")
    out["false_refusal_by_template"] = {name: rate for name, rate in by_template.items() if name != "all"}
    out["borderline_n"] = len(border_results)
    seconds["borderline"] = time.time() - start

    start = time.time()
    prompts = _sample(load_records(world / "rl_prompts_eval.jsonl", "prompts"), n_best_of, rng)
    # Rejection sampling's room at each temperature: the optimum moves with the model (paper Fig 8),
    # so the headroom that counts is the one at the best temperature.
    by_temperature = {}
    for temperature in temperatures:
        by_temperature[str(temperature)] = {str(k): v for k, v in best_of_k(
            model, tokenizer, prompts, ks=ks, temperature=temperature, max_new_tokens=max_new_tokens,
            batch_size=batch_size, seed=seed).items()}
    first, last = str(ks[0]), str(ks[-1])
    best = max(by_temperature, key=lambda t: by_temperature[t][last] - by_temperature[t][first])
    out["best_of_k_by_temperature"] = by_temperature
    out["best_of_k"], out["temperature"] = by_temperature[best], float(best)
    out["best_of_k_n"] = len(prompts)
    seconds["best_of_k"] = time.time() - start

    start = time.time()

    def tasks(records: list[dict]) -> list[dict]:
        return _sample([r for r in records if r.get("meta", {}).get("category") == "task"
                        and r["messages"][0]["role"] != "system"], n_tasks, rng)

    out["task_accuracy"] = {}
    for name, file in (("held-out", "sft_eval.jsonl"), ("seen", "sft_train.jsonl")):
        summary = suite_summary(oracle_answers(model, tokenizer, tasks(load_records(world / file, "chat")),
                                               max_new_tokens=max_new_tokens, batch_size=batch_size))
        out["task_accuracy"][name] = summary.get("accuracy", float("nan"))
        out["task_helpfulness_" + name] = summary["helpfulness"]
    seconds["tasks"] = time.time() - start
    out["seconds"] = seconds
    return out


def format_world_check(result: dict[str, Any]) -> str:
    """The check as plain-text tables (what ``llama2-lit world check`` prints)."""
    from llama2_lit.data import constraints as cons

    held_types, held_vectors = result["held_out"]["constraint_types"], result["held_out"]["attack_vectors"]
    lines = ["Constraint adherence (greedy; the model's own answers as context; system message in turn 1 only)"]
    lines.append(f"  {'type':<24}{'n':>5}" + "".join(f"{'turn ' + str(t):>9}" for t in REPORTED_TURNS))
    order = {kind: i for i, kind in enumerate((*cons.TRAINED_CONSTRAINT_TYPES, *cons.HELD_OUT_CONSTRAINT_TYPES, "all"))}
    for kind, turns in sorted(result["adherence"].items(), key=lambda item: order.get(item[0], len(order))):
        name = kind + (" (held out)" if kind in held_types else "")
        cells = "".join(f"{turns[str(t)]:>9.2f}" if str(t) in turns else f"{'-':>9}" for t in REPORTED_TURNS)
        lines.append(f"  {name:<24}{result['adherence_n'].get(kind, 0):>5}{cells}")
    lines += ["", "Harmful prompts by attack vector (violation = the oracle finds harmful content)",
              f"  {'vector':<36}{'n':>5}{'violation':>11}{'refusal':>9}"]
    for vector, rate in result["violation_by_vector"].items():
        name = vector + (" (held out)" if vector in held_vectors else "")
        lines.append(f"  {name:<36}{result['safety_n_by_vector'][vector]:>5}{rate:>11.3f}"
                     f"{result['refusal_by_vector'][vector]:>9.3f}")
    lines.append(f"  {'adversarial (all vectors)':<36}{'':>5}{result['violation_adversarial']:>11.3f}")
    by_template = result.get("false_refusal_by_template") or {}
    lines += ["", f"False refusals on borderline prompts: {result['false_refusal']:.3f} (n={result['borderline_n']}"
              + (f", {len(by_template)} held-out templates" if by_template else "") + ")"]
    cells = [f"{name.removesuffix('_eval')} {rate:.2f}" for name, rate in by_template.items()]
    lines += ["  " + ", ".join(cells[i:i + 5]) for i in range(0, len(cells), 5)]
    lines += ["", f"Best-of-K oracle helpfulness (oracle as the picker, n={result['best_of_k_n']} prompts)"]
    ks = list(result["best_of_k"])
    for temperature, values in result["best_of_k_by_temperature"].items():
        lines.append(f"  T={temperature:<5}" + "  ".join(f"K={k}: {v:.3f}" for k, v in values.items())
                     + f"   headroom {values[ks[-1]] - values[ks[0]]:+.3f}")
    lines.append(f"  headroom best-of-{ks[-1]} - best-of-{ks[0]} at the best temperature (T={result['temperature']}): "
                 f"{result['best_of_k'][ks[-1]] - result['best_of_k'][ks[0]]:+.3f}")
    lines += ["", "Task accuracy (greedy): " + "  ".join(f"{k} {v:.3f}" for k, v in result["task_accuracy"].items()),
              "", "Seconds: " + "  ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())]
    return "\n".join(lines)
