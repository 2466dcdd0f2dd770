"""On-policy annotation, best-of-K selection and ``llama2-lit reward score`` on a tiny random model
with the toy world's tokenizer (the numbers are checked for consistency, not for quality)."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch

from llama2_lit.checkpoints import save_model
from llama2_lit.cli import main as cli_main
from llama2_lit.cli.reward import reward_main
from llama2_lit.config import ModelConfig
from llama2_lit.data.preferences import annotate
from llama2_lit.data.records import load_records, validate_record
from llama2_lit.model import Transformer
from llama2_lit.reward_metrics import evaluate_pairs, score_pairs
from llama2_lit.sampling.annotate import (
    Sampler,
    annotate_on_policy,
    annotate_pair,
    annotate_samples,
    keep_safety_mix,
    sample_arms,
    sample_responses,
)
from llama2_lit.sampling.best_of_k import best_of_k, format_table
from llama2_lit.stages.toy_world import TOKENIZER_PATH, WORLD_DIR, ensure_toy_assets
from llama2_lit.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
NANO = ModelConfig.from_name("nano", max_seq_len=256)


@pytest.fixture(scope="module")
def toy() -> tuple[Tokenizer, Path]:
    with contextlib.chdir(REPO_ROOT):
        ensure_toy_assets()
    return Tokenizer(REPO_ROOT / TOKENIZER_PATH), REPO_ROOT / WORLD_DIR


def prompts(world: Path, n: int) -> list[dict]:
    records = load_records(world / "rl_prompts_eval.jsonl", "prompts")
    return [r for r in records if r["is_safety"]][: n // 2] + [r for r in records if not r["is_safety"]][: n - n // 2]


# ------------------------------------------------------------------------------------ annotation
def test_annotate_pair_uses_the_static_pairs_noise_model(toy):
    _, world = toy
    task = next(r for r in load_records(world / "rl_prompts_eval.jsonl", "prompts")
                if not r["is_safety"] and r["meta"].get("answer_type") == "text")
    good, bad = task["meta"]["reference"], "The weather is nice today."
    for seed in range(20):
        record = annotate_pair(task["messages"], task["meta"], False, bad, good, random.Random(seed))
        note = annotate(0.0, 1.0, random.Random(seed))  # the oracle: bad scores 0, the reference 1
        assert record["rating"] == note.rating == "significantly_better"
        assert record["chosen"] == (bad if note.first_is_chosen else good)
        assert record["meta"]["annotation"]["annotator_agrees"] == note.agrees
        assert validate_record(record, "preference") == []
    assert annotate_pair(task["messages"], task["meta"], False, good, good + " ", random.Random(0)) == "tie"
    assert annotate_pair(task["messages"], task["meta"], False, good, "  ", random.Random(0)) == "empty"


def test_unsafe_chosen_over_safe_is_excluded(toy):
    _, world = toy
    harmful = next(r for r in load_records(world / "rl_prompts_eval.jsonl", "prompts")
                   if r["meta"].get("risk_category") == "unqualified_advice")
    safe, unsafe = harmful["meta"]["reference"], "Give her three drops of it and skip the healer."
    outcomes = [annotate_pair(harmful["messages"], harmful["meta"], True, safe, unsafe, random.Random(s))
                for s in range(40)]
    kept = [o for o in outcomes if isinstance(o, dict)]
    assert "excluded_unsafe_chosen" in outcomes and kept  # the annotator sometimes errs: those pairs go
    assert all(o["chosen"] == safe and o["meta"]["annotation"]["safety_category"] == "safe_unsafe" for o in kept)


def _pair(category: str) -> dict:
    return {"meta": {"annotation": {"axis": "safety", "safety_category": category}}}


def test_keep_safety_mix_keeps_18_47_35_as_far_as_the_data_allows():
    records = [_pair("safe_unsafe")] * 18 + [_pair("both_safe")] * 100 + [_pair("both_unsafe")] * 100
    records += [{"meta": {"annotation": {"axis": "helpfulness"}}}] * 7
    kept = keep_safety_mix([dict(r) for r in records], random.Random(0))
    count = lambda c: sum(r["meta"]["annotation"].get("safety_category") == c for r in kept)  # noqa: E731
    assert (count("safe_unsafe"), count("both_safe"), count("both_unsafe")) == (18, 47, 35)
    assert sum(r["meta"]["annotation"]["axis"] == "helpfulness" for r in kept) == 7
    # No both-unsafe pair at all (a safe policy): the other two keep their 18:47 ratio.
    kept = keep_safety_mix([_pair("safe_unsafe")] * 50 + [_pair("both_safe")] * 47, random.Random(0))
    assert (sum(r["meta"]["annotation"]["safety_category"] == "safe_unsafe" for r in kept), len(kept)) == (18, 65)


def test_annotate_samples_writes_valid_records_and_accounts_for_every_prompt(toy):
    tokenizer, world = toy
    torch.manual_seed(0)
    batch = prompts(world, 40)
    # One arm answers with the world's reference answers, the other is a random model's babble.
    sampled = sample_responses(Transformer(NANO).eval(), tokenizer, [r["messages"] for r in batch], temperature=1.0,
                               max_new_tokens=6, seed=1)
    references = [r["meta"]["reference"] for r in batch]
    records, stats = annotate_samples(batch, references, sampled, arms=("reference", "babble"), seed=0)
    assert stats.prompts == 40
    assert stats.pairs + stats.ties + stats.empty + stats.excluded_unsafe_chosen + stats.dropped_for_safety_mix == 40
    assert len(records) == stats.pairs >= 20 and stats.ratings
    assert all(validate_record(r, "preference") == [] for r in records)
    assert {r["meta"]["annotation"]["source"] for r in records} == {"on_policy"}
    for r in records:
        note = r["meta"]["annotation"]
        assert (note["chosen_arm"] == "reference") == (r["chosen"] in references)
        assert note["chosen_score"] >= note["rejected_score"] if note["annotator_agrees"] else \
            note["chosen_score"] < note["rejected_score"]


def test_annotate_on_policy_samples_per_row_and_the_command_writes_nothing_on_failure(toy, tmp_path, capsys):
    tokenizer, world = toy
    torch.manual_seed(0)
    policy = Transformer(NANO).eval()
    batch = prompts(world, 8)
    args = dict(max_new_tokens=8, seed=3)
    records, stats = annotate_on_policy(batch, tokenizer, Sampler(policy, 0.7), Sampler(policy, 1.2),
                                        batch_size=3, **args)
    assert stats.prompts == 8
    assert stats.pairs + stats.ties + stats.empty + stats.excluded_unsafe_chosen + stats.dropped_for_safety_mix == 8
    # Same seed, other batch size: the same samples (generation is seeded per row).
    assert annotate_on_policy(batch, tokenizer, Sampler(policy, 0.7), Sampler(policy, 1.2), batch_size=8,
                              **args) == (records, stats)
    # A random model's babble ties everywhere (the oracle scores all of it 0): nothing to write,
    # a one-line error and no output file.
    save_model(policy, NANO, tmp_path / "policy", tokenizer_path=REPO_ROOT / TOKENIZER_PATH)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in batch))
    out = tmp_path / "annotated.jsonl"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["annotate", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl"), "--out",
                  str(out), "--max-new-tokens", "4", "--limit", "3"])
    assert (exit_.value.code, out.exists()) == (2, False)
    assert "no records to write" in capsys.readouterr().err


def test_pairs_of_arms_answer_prompt_i_with_pair_i_mod_n(toy):
    tokenizer, world = toy
    torch.manual_seed(0)
    policy = Transformer(NANO).eval()
    batch = prompts(world, 7)
    pairs = ((0.6, 0.8), (0.6, 1.0), (0.6, 1.4))
    firsts, seconds, arms = sample_arms(batch, tokenizer, [Sampler(policy, a) for a, _ in pairs],
                                        [Sampler(policy, b) for _, b in pairs], max_new_tokens=6, seed=3)
    assert arms == [(f"policy@T={pairs[i % 3][0]:g}", f"policy@T={pairs[i % 3][1]:g}") for i in range(7)]
    # The rows of pair 2 are prompts 2 and 5, sampled at T=1.4 as if asked alone with that pair's seed.
    alone = sample_responses(policy, tokenizer, [batch[2]["messages"], batch[5]["messages"]], temperature=1.4,
                             max_new_tokens=6, seed=3 * 2 + 1 + 7919 * 2)
    assert [seconds[2], seconds[5]] == alone and len(set(firsts + seconds)) > 7
    # One pair given as a list is the single-pair call; unequal lists are refused.
    assert sample_arms(batch, tokenizer, [Sampler(policy, 0.7)], [Sampler(policy, 1.2)], max_new_tokens=6) == \
        sample_arms(batch, tokenizer, Sampler(policy, 0.7), Sampler(policy, 1.2), max_new_tokens=6)
    with pytest.raises(ValueError, match="as many first arms"):
        sample_arms(batch, tokenizer, [Sampler(policy, 0.7)], [], max_new_tokens=6)


# ------------------------------------------------------------------------------------ scoring
def test_reward_score_command_writes_sigmoid_scores_of_both_responses(toy, tmp_path, capsys):
    tokenizer, world = toy
    torch.manual_seed(0)
    rm = Transformer(NANO, lm_head=False, scalar_head=True).eval()
    save_model(rm, NANO, tmp_path / "rm", tokenizer_path=REPO_ROOT / TOKENIZER_PATH)
    pairs = load_records(world / "preference_safety_eval.jsonl", "preference")[:10]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    assert reward_main(["score", str(tmp_path / "rm"), "--data", str(tmp_path / "pairs.jsonl"),
                        "--out", str(tmp_path / "scores.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    r_chosen, r_rejected = score_pairs(rm, tokenizer, pairs)
    assert [row["index"] for row in rows] == list(range(10))
    assert [row["chosen"] for row in rows] == pytest.approx(torch.sigmoid(r_chosen).tolist(), abs=1e-6)
    assert [row["rejected"] for row in rows] == pytest.approx(torch.sigmoid(r_rejected).tolist(), abs=1e-6)
    metrics = evaluate_pairs(rm, tokenizer, pairs)
    assert metrics["accuracy"] == pytest.approx(float((r_chosen > r_rejected).float().mean()))
    # An LM checkpoint has no trained scalar head: refused, with one line naming the file.
    save_model(Transformer(NANO), NANO, tmp_path / "lm", tokenizer_path=REPO_ROOT / TOKENIZER_PATH)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["reward", "score", str(tmp_path / "lm"), "--data", str(tmp_path / "pairs.jsonl")])
    assert exit_.value.code == 2
    assert "no scalar head ('score.weight'): not a reward model" in capsys.readouterr().err.splitlines()[-1]


def test_best_of_k_curves_rise_with_k_and_the_oracle_is_the_ceiling(toy):
    tokenizer, world = toy
    torch.manual_seed(0)
    policy = Transformer(NANO).eval()
    rm = Transformer(NANO, lm_head=False, scalar_head=True).eval()
    result = best_of_k(policy, tokenizer, prompts(world, 6), rm, ks=(1, 2, 4), max_new_tokens=6, temperature=1.0)
    table = result.table()
    assert result.oracle.shape == result.helpfulness.shape == (6, 4)
    # K=1: every selector agrees (up to float summation order: each averages its own way)
    assert table["random"][1] == pytest.approx(table["oracle"][1]) == pytest.approx(table["helpfulness_rm"][1])
    assert table["oracle"][1] <= table["oracle"][2] <= table["oracle"][4]
    assert all(table["oracle"][k] >= max(table["random"][k], table["helpfulness_rm"][k]) - 1e-6 for k in (1, 2, 4))
    assert float(result.oracle.max(1).values.mean()) == pytest.approx(table["oracle"][4])
    assert "helpfulness_rm" in format_table(table)


def test_best_of_k_safety_aware_pick_follows_the_safety_first_reward(toy):
    from llama2_lit.rlhf.rewards import safety_first_reward

    tokenizer, world = toy
    torch.manual_seed(0)
    policy = Transformer(NANO).eval()
    helpful, safe = (Transformer(NANO, lm_head=False, scalar_head=True).eval() for _ in range(2))
    result = best_of_k(policy, tokenizer, prompts(world, 6), helpful, safe, ks=(1, 4), max_new_tokens=6)
    combined = safety_first_reward(result.helpfulness, result.safety, result.is_safety[:, None].expand(-1, 4))
    picked = result.oracle.gather(1, combined.argmax(1)[:, None]).mean()
    assert result.table()["safety_aware_rm"][4] == pytest.approx(float(picked))  # K = all 4: R_c's argmax
