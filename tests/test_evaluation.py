"""The evaluation suite's pure parts: win / tie / loss counting, the oracle's pairwise outcomes, the
spread of a mean, the markdown tables."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest

from llama2_lit.data.oracle import Judgement
from llama2_lit.evaluation import (
    SUITES, Decoding, _standard_error, adherence_by_turn, adversarial_violation, attack_vector_rows, count_by,
    oracle_outcomes, rate_by, results_markdown, suite_summary, win_rate,
)


def answer(prompt: str, helpfulness: float, *, refusal: bool = False, safe: bool = True) -> dict:
    judgement = Judgement(helpfulness=helpfulness, safe=safe, violation=not safe, refusal=refusal,
                          constraint_ok=None, correct=helpfulness == 1.0, safety_rating=5 if safe else 1,
                          harm=0 if safe else 1, category="task", reasons=())
    return {"messages": [{"role": "user", "content": prompt}], "response": f"{helpfulness}", "judgement": judgement}


def test_oracle_outcomes_and_win_rate_count_ties():
    a = [answer("p1", 1.0), answer("p2", 0.5), answer("p3", 0.0), answer("p4", 0.2)]
    b = [answer("p1", 0.5), answer("p2", 0.5), answer("p3", 0.1), answer("p4", 0.1)]
    outcomes = oracle_outcomes(a, b)
    assert outcomes == [1, 0, -1, 1]
    assert win_rate(outcomes) == {"n": 4.0, "win": 0.5, "tie": 0.25, "loss": 0.25}
    assert math.isnan(win_rate([])["win"])
    with pytest.raises(ValueError, match="same prompts"):
        oracle_outcomes(a, list(reversed(b)))


def test_suite_summary_reports_the_standard_error_of_the_mean():
    results = [answer("p", h) for h in (0.0, 1.0, 1.0, 0.0)]
    summary = suite_summary(results)
    assert summary["helpfulness"] == 0.5 and summary["accuracy"] == 0.5
    assert summary["helpfulness_se"] == pytest.approx(math.sqrt(1 / 3 / 4))  # sample variance 1/3, n = 4
    assert math.isnan(_standard_error([1.0]))
    # the violation and false-refusal rates carry their spread too (a share of 0/1 outcomes)
    rates = suite_summary([answer("p", 0.0, safe=False), answer("q", 1.0), answer("r", 1.0, refusal=True),
                           answer("s", 1.0)])
    assert (rates["violation"], rates["refusal"]) == (0.25, 0.25)
    assert rates["violation_se"] == rates["refusal_se"] == pytest.approx(math.sqrt(0.25 / 4))  # variance 1/4, n = 4


def test_adherence_by_turn_can_count_only_some_constraint_types():
    rollouts = [[{"ok": {"signoff": True, "lowercase": False}}, {"ok": {"signoff": False, "lowercase": True}}],
                [{"ok": {"lowercase": True}}, {"ok": {"lowercase": False}}]]
    every = adherence_by_turn(rollouts)
    assert every["all"] == {1: 0.5, 2: 0.0} and every["lowercase"] == {1: 0.5, 2: 0.5}
    trained = adherence_by_turn(rollouts, types=("signoff",))
    # the second dialog carries no trained type: it is left out, not counted as followed
    assert trained == {"all": {1: 1.0, 2: 0.0}, "signoff": {1: 1.0, 2: 0.0}}


def test_violation_by_attack_vector_pools_the_adversarial_prompts_and_marks_the_held_out_one():
    results = [{**answer(f"p{i}", 0.0, safe=safe), "meta": {"attack_vector": vector}} for i, (vector, safe) in
               enumerate([("direct", True), ("direct", False), ("misspelling", False), ("role_play", True),
                          ("role_play", True), ("role_play", False)])]
    model = {"violation_by_vector": rate_by(results, "attack_vector"),
             "harmful_n_by_vector": count_by(results, "attack_vector")}
    assert model["harmful_n_by_vector"] == {"direct": 2, "misspelling": 1, "role_play": 3, "all": 6}
    assert adversarial_violation(model) == pytest.approx(2 / 4)  # direct requests left out
    header, _, row = attack_vector_rows({"sft": model})
    assert "| direct (n=2) |" in header and "| role play, held out (n=3) |" in header
    assert "| metaphor (n=0) |" in header  # a vector absent from the suite still has its column
    assert row == "| sft | 0.500 | - | - | 1.000 | - | 0.333 | - | 0.500 |"


def test_results_markdown_has_one_row_per_model_and_judge():
    suite = suite_summary([answer("p", 1.0), answer("q", 0.0, refusal=True)])
    results = {"decoding": asdict(Decoding()), "prompts_per_suite": 2,
               "models": {m: {"perplexity": 3.0, **{s: suite for s in SUITES}} for m in ("sft", "ppo")},
               "win_rates": {"ppo": {"baseline": "sft", "oracle": win_rate([1, 0]), "reward_model": win_rate([1, 1])}},
               "reward_models": {}}
    table = results_markdown(results)
    assert "temperature 0.1, top-p 0.9" in table
    assert "| ppo | 3.00 | 0.500 ± 0.500 | 0.500 | 0.500 | 0.000 | 0.500 |" in table
    assert "| ppo | sft | oracle | 0.500 | 0.500 | 0.000 |" in table
    assert "| ppo | sft | reward model | 1.000 | 0.000 | 0.000 |" in table


def test_evaluate_verb_names_a_missing_checkpoint_in_one_line(capsys, tmp_path):
    from llama2_lit.cli import run_verb

    assert run_verb("evaluate", [str(tmp_path / "nope.ckpt")]) == 2
    missing = tmp_path / "nope.ckpt"
    assert capsys.readouterr().err.strip() == f"llama2-lit evaluate: error: checkpoint {missing} does not exist"
