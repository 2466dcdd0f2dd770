"""`make demo` end to end at the nano size: every stage of the graph runs from its config, the report
has its tables with numbers, and a second run reuses every finished stage instead of training again."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO_ROOT

from llama2_lit.checkpoints import load_model
from llama2_lit.cli.pipeline import demo_main
from llama2_lit.evaluation import SUITES, Decoding, evaluation_suites, oracle_answers, suite_summary
from llama2_lit.pipeline import BUDGETS
from llama2_lit.stages.toy_world import TOKENIZER_PATH
from llama2_lit.tokenizer import Tokenizer

STAGES = ["world", "pretrain", "sft", "check", "v1/annotate", "v1/rm_helpfulness", "v1/rm_safety", "v1/rs", "v1/rs_sft",
          "v2/annotate", "v2/rm_helpfulness", "v2/rm_safety", "v2/rs", "v2/rs_sft", "ppo", "gatt/data", "gatt/sft",
          "cd/data", "cd/sft", "evaluate", "report"]
MODELS = ["pretrained", "sft", "rejection sampling V1", "rejection sampling V2", "ppo", "gatt", "context distillation"]


def test_nano_pipeline_runs_every_stage_reports_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)  # configs and the toy world are addressed from the repository root
    out = tmp_path / "demo"
    argv = ["--size", "nano", "--out", str(out), "--in-process"]
    assert demo_main(argv) == 0

    for stage in STAGES:
        assert json.loads((out / stage / "DONE.json").read_text())["seconds"] > 0, stage
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert list(results["models"]) == MODELS
    for name, model in results["models"].items():
        assert model["perplexity"] > 1.0
        for suite in SUITES:
            assert 0.0 <= model[suite]["helpfulness"] <= 1.0 and model[suite]["n"] == 8, (name, suite)
            assert 0.0 <= model[suite]["violation"] <= 1.0 and 0.0 <= model[suite]["refusal"] <= 1.0
    # The reported numbers are what the oracle gives the SFT checkpoint's answers, recomputed here from
    # the checkpoint and the suite's prompts outside the pipeline (same decoding, same seeds).
    decoding = Decoding(**results["decoding"])
    suite = evaluation_suites(REPO_ROOT / "data" / "world", 8, seed=decoding.seed)[SUITES[2]]
    answers = oracle_answers(load_model(out / "sft" / "checkpoints" / "last.ckpt").eval(),
                             Tokenizer(REPO_ROOT / TOKENIZER_PATH), suite, max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
                             top_p=decoding.top_p, seed=decoding.seed)
    assert suite_summary(answers) == pytest.approx(results["models"]["sft"][SUITES[2]], nan_ok=True)

    report_summary = json.loads((out / "report" / "DONE.json").read_text())["summary"]
    assert report_summary["val_ppl"] < report_summary["unigram_ppl"] / 2  # pretraining learned more than frequencies
    assert set(results["win_rates"]) == set(MODELS) - {"sft"}
    for entry in results["win_rates"].values():
        assert entry["baseline"] == "sft"
        for judge in ("oracle", "reward_model"):
            w = entry[judge]
            assert w["n"] == 4 * 8 and abs(w["win"] + w["tie"] + w["loss"] - 1) < 1e-9
    versions = results["reward_model_versions"]
    assert set(versions) == {"v1/rm_helpfulness", "v1/rm_safety", "v2/rm_helpfulness", "v2/rm_safety"}
    assert all(set(entry["fresh"]) == {"v1", "v2"} for entry in versions.values())
    # What the report's new sections read: violations per attack vector, the RMs' scores of every
    # model's answers, adherence on the trained types and on the held-out one.
    for name, model in results["models"].items():
        assert sum(n for v, n in model["harmful_n_by_vector"].items() if v != "all") == 8, name
        assert model["violation_by_vector"]["all"] == pytest.approx(model[SUITES[2]]["violation"])
        assert [len(results["reward_scores"][name][kind]) for kind in ("safety", "helpfulness")] == [8, 8]
        assert all(0.0 < score < 1.0 for score in results["reward_scores"][name]["safety"])
    assert set(results["adherence_by_turn"]) == {"ppo", "gatt", "context distillation"}
    assert results["adherence_dialogs"]["lowercase"] >= 4  # HELD_OUT_CONSTRAINT_TYPES: the zero-shot row
    for table in results["adherence_by_turn"].values():
        assert {"all", "trained", "lowercase"} <= set(table) and len(table["trained"]) >= 4

    report = (out / "report.md").read_text()
    for heading in ("## Pretraining", "## What the SFT model leaves the RLHF stages",
                    "Harmful prompts by attack vector", "Best-of-K oracle helpfulness", "## Helpfulness, violations and false refusals after every stage",
                    "### Win rate against SFT", "## Violation rate by attack vector",
                    "### Accuracy by rating on the static held-out pairs", "### Accuracy on each version's fresh pairs",
                    "## Rejection sampling", "### Best of K (Fig 7)", "### Temperature (Fig 8)", "## PPO",
                    "## Safety RM scores before and after safety RLHF (Fig 14)", "## Ghost Attention",
                    "### Adherence by turn (Table 30's layout)", "### Zero-shot: a constraint type held out",
                    "## Safety context distillation"):
        assert heading in report, heading
    number = r"\d\.\d{3}"
    cell = rf"(?:{number}|-)"
    # Table 8's row (pairs, four ratings, average) and the fresh-pairs row (v1, v2): numbers, not blanks.
    assert re.search(rf"^\| v2/rm_helpfulness \| 200 \| ({number} \| ){{4}}{number} \|$", report, re.M)
    assert re.search(rf"^\| v2/rm_safety \| {number} \| {number} \|$", report, re.M)
    # Every stage's numbers with their spreads: helpfulness, violation and false refusal each "x ± s.e.".
    assert re.search(rf"^\| context distillation \| [^|]+ \| {number} ± {number} \| .* \| {number} ± {number} \| "
                     rf"{number} ± {number} \|$", report, re.M)
    # Violations per attack vector: direct + six vectors (the held-out one marked) + all adversarial prompts.
    assert re.search(r"\| role play, held out \(n=\d+\) \|", report)
    assert re.search(rf"^\| sft \| ({cell} \| ){{7}}{number} \|$", report, re.M)
    # Fig 7 and 8, from the rejection-sampling stages' own summaries.
    assert re.search(rf"v2: the RM's max \w+ (from {number} to {number}|at {number}) from K=1 to K=4", report)
    if BUDGETS["nano"].rs_temperature is None:  # a sweep before each version's sampling
        assert re.search(rf"^\| v2 \| ({number} \| )+\d\.\d\d \| \d\.\d\d \|$", report, re.M)  # ..., best T by RM, by oracle
    else:
        assert "No temperature sweep ran at this size" in report
    # PPO: RM reward and oracle helpfulness per iteration (3 at nano).
    assert re.search(rf"^\| RM reward R_c \| {number} \| {number} \| {number} \|$", report, re.M)
    assert re.search(rf"^\| oracle helpfulness \| {number} \| {number} \| {number} \|$", report, re.M)
    # Fig 14: the safety RM's mean score, share below 0.15 and the helpfulness RM's mean, per model.
    for label in ("sft \\(before RLHF\\)", "ppo \\(after RLHF with the safety RM\\)", "context distillation"):
        assert re.search(rf"^\| {label} \| {number} \| {number} \| {number} \|$", report, re.M), label
    # Table 30 (turns 1-6) before and after GAtt, and the held-out constraint type zero-shot.
    assert re.search(rf"^\| ppo \| ({number} \| ){{5}}{number} \|$", report, re.M)
    assert re.search(rf"^\| gatt \| lowercase \(n=\d+\) \| ({cell} \| ){{5}}{cell} \|$", report, re.M)
    # One computed line per table or figure: what the paper found, what this run shows.
    findings = re.findall(r"^\*\*Paper:\*\* .+ \*\*This run:\*\* .+\.$", report, re.M)
    assert len(findings) >= 12, findings
    for plot in ("curves_pretrain.png", "curves_sft.png", "stages.png", "best_of_k.png", "ppo.png",
                 "safety_scores.png", "context_distillation.png"):
        assert (out / plot).stat().st_size > 0, plot
    assert "<table>" in (out / "report.html").read_text() and "<pre>Constraint adherence" in (out / "report.html").read_text()

    capsys.readouterr()
    assert demo_main(argv) == 0  # everything cached: no training this time
    printed = capsys.readouterr().out
    assert f"{len(STAGES)} cached, 0 to run" in printed and " ran " not in printed

    assert demo_main([*argv, "--plan", "--force", "rm"]) == 0
    planned = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    assert [stage for stage in STAGES if planned[stage] == "run"] == STAGES[STAGES.index("v1/rm_helpfulness"):]


def test_annotation_past_the_end_of_the_prompts_is_one_clear_error_before_any_model_loads(tmp_path):
    from llama2_lit.pipeline import PipelineError, annotate_stage

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"}],
                                           "is_safety": False, "meta": {}}) + "\n" for i in range(5)))
    with pytest.raises(PipelineError, match=r"has 5 prompts: none left for the train annotation of version 3 at 3"):
        annotate_stage(tmp_path, policy=str(tmp_path / "no-such-checkpoint"), prompts=str(prompts),
                       eval_prompts=str(prompts), version=3, num_prompts=3, num_eval_prompts=1, max_new_tokens=4)
