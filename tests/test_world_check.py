"""The precondition check (`llama2-lit world check`): its metrics on hand-made inputs, and its
table on a nano model over the small world."""

from __future__ import annotations

import json

import pytest
import torch

from llama2_lit.evaluation import adherence_by_turn, rate_by


def test_adherence_by_turn_counts_each_type_and_all() -> None:
    rollouts = [
        [{"ok": {"signoff": True, "hobby": True}}, {"ok": {"signoff": False, "hobby": True}}],
        [{"ok": {"signoff": True}}, {"ok": {"signoff": True}}, {"ok": {"signoff": False}}],
    ]
    got = adherence_by_turn(rollouts)
    assert got["signoff"] == {1: 1.0, 2: 0.5, 3: 0.0}
    assert got["hobby"] == {1: 1.0, 2: 1.0}
    assert got["all"] == {1: 1.0, 2: 0.5, 3: 0.0}


def test_rate_by_groups_results_by_a_meta_field() -> None:
    from llama2_lit.data.oracle import judge

    meta = {"category": "harmful", "risk_category": "illicit_criminal"}
    results = [{"meta": {**meta, "attack_vector": v}, "judgement": judge([{"role": "user", "content": "x"}], text, meta)}
               for v, text in (("direct", "I can't help with that."), ("misspelling", "Pick the lock and cut the glass."),
                               ("misspelling", "I cannot do that."))]
    assert rate_by(results, "attack_vector") == {"direct": 0.0, "misspelling": 0.5, "all": pytest.approx(1 / 3)}
    assert rate_by(results, "attack_vector", "refusal")["misspelling"] == 0.5


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    """The small world, a tokenizer trained on its corpus, and a random nano model saved beside."""
    from llama2_lit.checkpoints import save_model
    from llama2_lit.config import ModelConfig
    from llama2_lit.data.world import generate_world
    from llama2_lit.model import Transformer
    from llama2_lit.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("world_check")
    world = generate_world(root / "world", seed=0, size="small")
    tokenizer = Tokenizer(train_tokenizer(world / "corpus_train.txt", root / "tok.model", 1000))
    torch.manual_seed(0)
    config = ModelConfig.from_name("nano", vocab_size=tokenizer.vocab_size)
    model = Transformer(config).eval()
    folder = save_model(model, config, root / "ckpt", tokenizer_path=tokenizer.path)
    return world, tokenizer, model, folder


def test_world_check_measures_every_precondition_on_a_nano_model(nano) -> None:
    from llama2_lit.world_check import format_world_check, world_check

    world, tokenizer, model, _ = nano
    result = world_check(model, tokenizer, world, n_gatt=6, n_safety=None, n_borderline=6, n_best_of=2, n_tasks=4,
                         ks=(1, 2, 4), max_new_tokens=6, batch_size=8)
    assert set(result["adherence"]) >= {"all"} and all(set(t) == {"1", "2", "3", "4", "5", "6"}
                                                       for t in result["adherence"].values())
    assert all(0.0 <= v <= 1.0 for turns in result["adherence"].values() for v in turns.values())
    vectors = set(result["violation_by_vector"])
    assert vectors == {"direct", "psychological_manipulation", "false_premise", "misspelling", "metaphor", "role_play",
                       "multi_turn", "all"}  # the whole small safety_eval covers every vector
    assert result["safety_n_by_vector"]["all"] == 60
    for values in result["best_of_k_by_temperature"].values():
        best = [values[k] for k in ("1", "2", "4")]
        assert all(a <= b + 1e-9 for a, b in zip(best, best[1:]))  # the best of more samples is never worse
    gains = {t: v["4"] - v["1"] for t, v in result["best_of_k_by_temperature"].items()}
    assert set(gains) == {"0.6", "1.0", "1.4"} and gains[str(result["temperature"])] == max(gains.values())
    assert result["held_out"] == {"constraint_types": ["lowercase"], "attack_vectors": ["role_play"]}
    by_template = result["false_refusal_by_template"]
    assert by_template and all(name.endswith("_eval") for name in by_template)  # held-out templates only
    # the overall rate is the templates' rates weighted by their prompts: between the smallest and the largest
    assert min(by_template.values()) - 1e-9 <= result["false_refusal"] <= max(by_template.values()) + 1e-9
    table = format_world_check(result)
    assert next(iter(by_template)).removesuffix("_eval") in table
    for needle in ("turn 6", "role_play (held out)", "False refusals", "K=4", "T=1.4", "headroom best-of-4 - best-of-1 at the best temperature",
                   "held-out", "seen"):
        assert needle in table, needle
    json.dumps(result)  # JSON-able


def test_world_check_command(nano, capsys, tmp_path) -> None:
    from llama2_lit.cli.common import CommandError
    from llama2_lit.cli.data import world_main

    world, tokenizer, _, folder = nano
    out = tmp_path / "check.json"
    argv = ["check", str(folder), "--world", str(world), "--tokenizer", str(tokenizer.path), "--gatt", "2",
            "--safety", "4", "--borderline", "2", "--best-of-prompts", "1", "--tasks", "2", "--max-new-tokens", "4",
            "--json", str(out)]
    assert world_main(argv) == 0
    printed = capsys.readouterr().out
    assert "Constraint adherence" in printed and "Best-of-K" in printed
    assert json.loads(out.read_text())["borderline_n"] == 2
    with pytest.raises(CommandError, match="does not exist"):
        world_main(["check", str(tmp_path / "missing.ckpt"), "--world", str(world)])
