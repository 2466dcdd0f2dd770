"""`make demo` end to end at the nano size: stages run from their configs, the report has numbers,
and a second run reuses the finished stages instead of training again."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT

from llama2_lit.checkpoints import load_model
from llama2_lit.cli.pipeline import demo_main
from llama2_lit.evaluation import oracle_answers, suite_summary
from llama2_lit.pipeline import evaluation_suites
from llama2_lit.stages.toy_world import TOKENIZER_PATH
from llama2_lit.tokenizer import Tokenizer


def test_pipeline_runs_every_stage_reports_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)  # configs and the toy world are addressed from the repository root
    out = tmp_path / "demo"
    argv = ["--size", "nano", "--out", str(out), "--eval-prompts", "8", "--max-new-tokens", "24",
            "--pretrain-args", "--trainer.max_steps 60 --trainer.val_check_interval 30",
            "--sft-args", "--trainer.max_steps 20 --trainer.val_check_interval 20"]
    assert demo_main(argv) == 0

    scores = json.loads((out / "scores.json").read_text())
    assert scores["val_ppl"] < scores["unigram_ppl"] / 2  # pretraining learned more than word frequencies
    assert set(scores["scores"]) == {"pretrained", "sft"}
    for model in scores["scores"].values():
        assert set(model) == {"tasks (held-out)", "tasks (seen)", "harmful (held-out)", "borderline (held-out)"}
        assert all(suite["n"] == 8 for suite in model.values())
    assert scores["scores"]["sft"] != scores["scores"]["pretrained"]  # two different models were judged

    # The reported numbers are what the oracle gives the SFT checkpoint's greedy answers, recomputed here
    # from the checkpoint and the suite's prompts outside the pipeline.
    suite = evaluation_suites(REPO_ROOT / "data" / "world", 8)["harmful (held-out)"]
    answers = oracle_answers(load_model(out / "sft" / "checkpoints" / "last.ckpt").eval(),
                             Tokenizer(REPO_ROOT / TOKENIZER_PATH), suite, max_new_tokens=24)
    recomputed = suite_summary(answers)
    assert recomputed == pytest.approx(scores["scores"]["sft"]["harmful (held-out)"], nan_ok=True)
    assert f"| harmful (held-out) | 8 | sft | {recomputed['helpfulness']:.3f} |" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert "## Pretraining" in report and "## Supervised fine-tuning" in report
    assert (out / "curves_pretrain.png").stat().st_size > 0 and (out / "curves_sft.png").stat().st_size > 0

    capsys.readouterr()
    assert demo_main(argv) == 0  # everything cached: no training this time
    printed = capsys.readouterr().out
    assert "[pretrain] cached" in printed and "[sft] cached" in printed
