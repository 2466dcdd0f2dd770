"""Rejection sampling (paper section 3.2.3): selection by R_c, the pool, the best-of-K estimator, the
sampling seeds, the reward models' scores, the predict loop, and a nano sample -> records -> SFT run."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from llama2_lit.chat import encode_dialog
from llama2_lit.checkpoints import save_model
from llama2_lit.config import ModelConfig
from llama2_lit.data.records import load_records, validate_record
from llama2_lit.model import Transformer
from llama2_lit.rlhf.best_of_k import expected_max_of_k, expected_median_of_k, expected_order_statistic
from llama2_lit.sampling.rejection import (
    RewardModels,
    best_of_k_curves,
    combined_reward,
    draw_samples,
    pick_agreement,
    pool_training_set,
    predict_rejection_samples,
    prompt_key,
    rejection_sample,
    run_rejection_sampling_iteration,
    select_best,
    temperature_sweep,
    update_pool,
)
from llama2_lit.stages.toy_world import ensure_toy_assets
from llama2_lit.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ selection
def test_r_c_takes_the_safety_score_for_tagged_prompts_and_below_the_threshold():
    helpfulness = torch.tensor([[0.9, 0.3, 0.6], [0.9, 0.3, 0.6], [0.95, 0.6, 0.5], [0.95, 0.6, 0.5]])
    safety = torch.tensor([[0.5, 0.95, 0.2], [0.5, 0.95, 0.2], [0.14, 0.9, 0.9], [0.15, 0.9, 0.9]])
    is_safety = torch.tensor([False, True, False, False])
    reward = combined_reward(helpfulness, safety, is_safety)
    expected = torch.tensor([[0.9, 0.3, 0.6],      # untagged, every R_s >= 0.15: helpfulness
                             [0.5, 0.95, 0.2],     # safety-tagged: the safety score throughout
                             [0.14, 0.6, 0.5],     # R_s = 0.14 < 0.15: the safety score for that sample
                             [0.95, 0.6, 0.5]])    # R_s = 0.15 exactly: not below, helpfulness
    assert torch.equal(reward, expected)
    assert select_best(reward).tolist() == [0, 1, 1, 0]
    # The most helpful answer loses when the safety model flags it (row 2), as the 0.15 rule intends.


def test_select_best_skips_ineligible_samples_and_reports_prompts_without_one():
    reward = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.5, 0.2], [0.3, 0.2, 0.1]])
    eligible = torch.tensor([[False, True, True], [True, True, True], [False, False, False]])
    assert select_best(reward, eligible).tolist() == [1, 0, -1]  # ties: the first


def test_pick_agreement_counts_oracle_ties_as_agreement():
    reward = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1]])
    oracle = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.5]])
    stats = pick_agreement(reward, oracle)
    assert stats["pick_agreement"] == 0.5  # row 0: the pick (0) has the best oracle score; row 1 does not
    assert stats["pick_same_index"] == 0.5
    assert stats["oracle_of_pick"] == pytest.approx(0.5) and stats["oracle_of_oracle_pick"] == pytest.approx(1.0)
    assert stats["oracle_mean"] == pytest.approx((2 / 3 + 1.5 / 3) / 2)


# ------------------------------------------------------------------------------------ estimators
def brute_force(values: list[float], k: int, j: int, keys: list[float] | None = None) -> float:
    keys = keys or values
    picks = []
    for subset in itertools.combinations(range(len(values)), k):
        ranked = sorted(subset, key=lambda i: keys[i])
        picks.append(values[ranked[j - 1]])
    return sum(picks) / len(picks)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_order_statistic_estimator_equals_the_average_over_all_subsets(n):
    generator = torch.Generator().manual_seed(n)
    values = torch.rand(3, n, generator=generator, dtype=torch.float64)
    values[0, :2] = 0.5  # ties
    keys = torch.rand(3, n, generator=generator, dtype=torch.float64)
    for k in range(1, n + 1):
        for j in range(1, k + 1):
            estimate = expected_order_statistic(values, k, j)
            by_key = expected_order_statistic(values, k, j, order_by=keys)
            for row in range(3):
                assert estimate[row].item() == pytest.approx(brute_force(values[row].tolist(), k, j))
                assert by_key[row].item() == pytest.approx(brute_force(values[row].tolist(), k, j, keys[row].tolist()))
        median = expected_median_of_k(values, k)[1].item()
        if k % 2:
            assert median == pytest.approx(brute_force(values[1].tolist(), k, (k + 1) // 2))
        else:
            assert median == pytest.approx(0.5 * (brute_force(values[1].tolist(), k, k // 2)
                                                  + brute_force(values[1].tolist(), k, k // 2 + 1)))
    assert torch.allclose(expected_max_of_k(values, 1), values.mean(-1))
    assert torch.allclose(expected_max_of_k(values, n), values.max(-1).values)


def test_expected_max_of_k_is_unbiased_where_one_draw_of_k_is_noisy():
    # Uniform(0, 1): E[max of k] = k / (k + 1). From N = 32 draws per prompt over 2000 prompts the
    # estimator is within 0.005 of it; one draw of k per prompt would be as unbiased but noisier.
    draws = torch.rand(2000, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (1, 4, 16, 32):
        assert expected_max_of_k(draws, k).mean().item() == pytest.approx(k / (k + 1), abs=0.005)


def test_best_of_k_curves_max_rises_and_median_is_flat():
    draws = torch.rand(500, 16, generator=torch.Generator().manual_seed(1))
    curves = best_of_k_curves(draws, 1 - draws, [1, 2, 4, 8, 16])
    maxima = [row["reward_max"] for row in curves]
    assert maxima == sorted(maxima) and maxima[-1] == pytest.approx(16 / 17, abs=0.01)
    assert all(row["reward_median"] == pytest.approx(0.5, abs=0.03) for row in curves)
    # The oracle here disagrees completely with the reward: its score of the reward's pick falls.
    assert curves[-1]["oracle_of_pick"] < curves[0]["oracle_of_pick"] < curves[-1]["oracle_max"]


# ------------------------------------------------------------------------------------ the pool
def record(key_text: str, response: str, iteration: int, reward: float = 0.0) -> dict:
    messages = [{"role": "user", "content": key_text}]
    info = {"reward_helpfulness": reward, "reward_safety": 0.9, "reward": reward, "reward_at_sampling": reward,
            "scored_at_iteration": iteration, "num_samples": 4, "temperature": 1.0, "iteration": iteration,
            "sample_index": 0, "is_safety": False, "prompt_key": prompt_key(messages)}
    return {"messages": [*messages, {"role": "assistant", "content": response}],
            "meta": {"category": "task", "rejection_sampling": info}}


class TableScorer:
    """A fake reward model: fixed (helpfulness, safety) per response text."""

    def __init__(self, table: dict[str, tuple[float, float]]) -> None:
        self.table = table

    def __call__(self, prompts, responses, metas):
        scores = [self.table[r] for r in responses]
        return torch.tensor([h for h, _ in scores]), torch.tensor([s for _, s in scores])


def test_the_pool_keeps_the_best_sample_of_every_iteration_rescored_by_the_latest_models():
    pool = update_pool([], [record("a?", "a1", 1), record("b?", "b1", 1)])
    pool = update_pool(pool, [record("a?", "a2", 2), record("b?", "b2", 2), record("c?", "c2", 2)])
    assert len(pool) == 5
    # The latest reward models prefer iteration 1's answer for "a?" and flag b2 as unsafe.
    latest = TableScorer({"a1": (0.9, 0.9), "a2": (0.6, 0.9), "b1": (0.5, 0.9), "b2": (0.8, 0.1), "c2": (0.3, 0.9)})
    train = pool_training_set(pool, latest, iteration=2)
    chosen = {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in train}
    assert chosen == {"a?": "a1", "b?": "b1", "c?": "c2"}
    a1 = next(r for r in train if r["messages"][-1]["content"] == "a1")["meta"]["rejection_sampling"]
    assert (a1["iteration"], a1["scored_at_iteration"], a1["reward"]) == (1, 2, pytest.approx(0.9))
    assert all(not validate_record(r, "chat") for r in train)

    # Re-running iteration 2 replaces its samples; an answer kept twice is held once (the latest).
    again = update_pool(pool, [record("a?", "a1", 2), record("b?", "b3", 2)])
    assert sorted((r["messages"][-1]["content"], r["meta"]["rejection_sampling"]["iteration"]) for r in again) == \
        [("a1", 2), ("b1", 1), ("b3", 2)]


# ------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def toy() -> tuple[Path, Tokenizer]:
    with contextlib.chdir(REPO_ROOT):
        world, tokenizer_path = ensure_toy_assets()
    return REPO_ROOT / world, Tokenizer(REPO_ROOT / tokenizer_path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, toy) -> dict[str, Path]:
    """A random nano policy and two random nano reward models, saved in our format."""
    folder = tmp_path_factory.mktemp("models")
    config = ModelConfig.from_name("nano")
    torch.manual_seed(0)
    paths = {"policy": folder / "policy", "rm_h": folder / "rm_h", "rm_s": folder / "rm_s"}
    tokenizer_path = REPO_ROOT / "data" / "tokenizer" / "toy-4096.model"
    save_model(Transformer(config), config, paths["policy"], tokenizer_path=tokenizer_path)
    for name in ("rm_h", "rm_s"):
        save_model(Transformer(config, lm_head=False, scalar_head=True), config, paths[name])
    return paths


@pytest.fixture(scope="module")
def prompts(toy) -> list[dict]:
    world, _ = toy
    records = load_records(world / "rl_prompts_train.jsonl", "prompts")
    safety = [r for r in records if r["is_safety"]][:2]
    return [r for r in records if not r["is_safety"]][:3] + safety


def test_samples_do_not_depend_on_the_batch_they_are_drawn_in(models, prompts, toy):
    from llama2_lit.checkpoints import load_model

    _, tokenizer = toy
    policy = load_model(models["policy"])
    options = {"num_samples": 3, "temperature": 1.0, "max_new_tokens": 8, "seed": 5}
    together = draw_samples(policy, tokenizer, prompts, batch_size=64, **options)
    apart = draw_samples(policy, tokenizer, prompts, batch_size=2, **options)
    last_alone = draw_samples(policy, tokenizer, prompts[-1:], batch_size=1, **options)
    assert together == apart and together[-1] == last_alone[0]
    assert len(set(together[0][0])) == 3  # three different samples of one prompt
    next_iteration = draw_samples(policy, tokenizer, prompts, batch_size=64, iteration=2, **options)
    assert next_iteration != together  # a new iteration draws new samples


def test_reward_models_score_the_finished_dialog_at_its_last_token(models, prompts, toy):
    from llama2_lit.checkpoints import load_model

    _, tokenizer = toy
    scorer = RewardModels.from_checkpoints(models["rm_h"], models["rm_s"], tokenizer, batch_size=2)
    responses = ["Dunmar.", "I can't help with that.", "12 + 7 = 19.", "[INST] no", "ok"]
    messages = [p["messages"] for p in prompts]
    helpfulness, safety = scorer(messages, responses, [p["meta"] for p in prompts])
    rm = load_model(models["rm_h"], lm_head=False, scalar_head=True)
    for i in (0, 2):
        ids = encode_dialog(tokenizer, [*messages[i], {"role": "assistant", "content": responses[i]}]).ids
        assert ids[-1] == tokenizer.eos_id
        alone = torch.sigmoid(rm.score_sequences(torch.tensor([ids]))).item()
        assert helpfulness[i].item() == pytest.approx(alone, abs=1e-5)  # padding in its batch changes nothing
    assert helpfulness[3].item() == 0.0 and safety[3].item() == 0.0  # a chat tag cannot be encoded: 0
    assert ((safety > 0) & (safety < 1)).sum() == 4 and not torch.equal(helpfulness, safety)


def test_predict_loop_gives_the_python_functions_samples(models, prompts, toy):
    from llama2_lit.checkpoints import load_model

    _, tokenizer = toy
    options = {"num_samples": 2, "temperature": 1.0, "max_new_tokens": 8, "seed": 3, "require_eos": False}
    scorer = RewardModels.from_checkpoints(models["rm_h"], models["rm_s"], tokenizer)
    direct = rejection_sample(load_model(models["policy"]), scorer, tokenizer, prompts, **options)
    predicted = predict_rejection_samples(models["policy"], models["rm_h"], models["rm_s"], prompts,
                                          tokenizer_path=models["policy"] / "tokenizer.model", prompts_per_batch=2,
                                          trainer_options={"accelerator": "cpu", "devices": 1}, **options)
    assert [s.index for s in predicted] == list(range(len(prompts)))
    for a, b in zip(direct, predicted):
        assert (a.responses, a.best) == (b.responses, b.best)
        assert a.reward == pytest.approx(b.reward, abs=1e-6)


def test_temperature_sweep_picks_the_temperature_with_the_highest_expected_best_of_k(models, prompts, toy):
    from llama2_lit.checkpoints import load_model
    from llama2_lit.sampling.rejection import OracleRewards

    _, tokenizer = toy
    sweep = temperature_sweep(load_model(models["policy"]), OracleRewards(), tokenizer, prompts[:3],
                              temperatures=(0.5, 1.5), num_samples=4, target_k=4, max_new_tokens=6)
    assert [(row["temperature"], row["k"]) for row in sweep.rows] == [(0.5, 1), (0.5, 2), (0.5, 4),
                                                                      (1.5, 1), (1.5, 2), (1.5, 4)]
    at_k = sweep.at(4)
    assert sweep.best_temperature == max(at_k, key=lambda t: at_k[t]["reward_max"])
    # With the oracle as the reward, its pick is the oracle's best.
    assert all(row["oracle_of_pick"] == pytest.approx(row["oracle_max"]) for row in sweep.rows)


# ------------------------------------------------------------------------------------ end to end
def test_nano_sample_records_and_rejection_sampling_fine_tuning(models, toy, tmp_path, monkeypatch):
    world, _ = toy
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "rs"
    common = {"num_samples": 3, "num_prompts": 5, "max_new_tokens": 12, "require_eos": False, "wandb": False}
    first = run_rejection_sampling_iteration(
        models["policy"], models["rm_h"], models["rm_s"], world / "rl_prompts_train.jsonl", out, iteration=1,
        temperature=None, temperatures=(0.7, 1.3), sweep_prompts=2,
        finetune_config=REPO_ROOT / "configs" / "nano" / "rejection_sampling.yaml",
        finetune_args=["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--run.wandb", "false",
                       "--trainer.enable_model_summary", "false"],
        eval_prompts_file=world / "rl_prompts_eval.jsonl", eval_prompts=3, **common)
    step = out / "iteration-1"
    assert first["temperature"] in (0.7, 1.3) and first["temperature"] == first["sweep"]["best_temperature"]
    best = load_records(step / "best.jsonl", "chat")  # validated on load
    assert len(best) == first["kept"] == 5
    info = best[0]["meta"]["rejection_sampling"]
    assert {k: info[k] for k in ("num_samples", "temperature", "iteration")} == \
        {"num_samples": 3, "temperature": first["temperature"], "iteration": 1}
    samples = [json.loads(line) for line in (step / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 15 and sum(s["kept"] for s in samples) == 5
    kept = next(s for s in samples if s["kept"] and s["prompt_index"] == 0)
    assert max(s["reward"] for s in samples if s["prompt_index"] == 0) == kept["reward"] == info["reward"]
    assert "category" in best[0]["meta"]  # the prompt's meta travels: the oracle can judge the record
    # The SFT module fine-tuned on the kept set, from the policy.
    checkpoint = torch.load(first["finetuned"], weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["model_config"]["name"] == "nano"
    assert set(first["evaluation"]["summaries"]) == {"baseline", "finetuned"}
    assert {"helpfulness", "accuracy", "violation"} <= set(first["evaluation"]["summaries"]["finetuned"])
    with (out / "metrics.csv").open() as handle:
        logged = {row["metric"] for row in csv.DictReader(handle)}
    assert {"rs/kept", "rs/pick_agreement", "rs/temperature", "eval/finetuned/helpfulness",
            "eval/gap/finetuned/helpfulness_gap"} <= logged
    assert [row["k"] for row in csv.DictReader((step / "curves.csv").open())] == ["1", "2", "3"]

    # A second iteration (no fine-tuning here) pools: every prompt now has two candidates.
    second = run_rejection_sampling_iteration(first["finetuned"], models["rm_h"], models["rm_s"],
                                              world / "rl_prompts_train.jsonl", out, iteration=2, temperature=1.0,
                                              **common)
    pool = load_records(out / "pool.jsonl", "chat")
    assert sorted({r["meta"]["rejection_sampling"]["iteration"] for r in pool}) == [1, 2]
    assert second["pool"] == len(pool) and 5 < len(pool) <= 10 and second["train"] == 5
    train = load_records(out / "iteration-2" / "train.jsonl", "chat")
    rewards = {}
    for r in pool:  # the same reward models both iterations: the stored scores are comparable
        info = r["meta"]["rejection_sampling"]
        rewards.setdefault(info["prompt_key"], []).append(info["reward"])
    for r in train:
        info = r["meta"]["rejection_sampling"]
        assert info["reward"] == pytest.approx(max(rewards[info["prompt_key"]]), abs=1e-6)
        assert info["scored_at_iteration"] == 2
    assert math.isfinite(second["pick_agreement"])


@pytest.mark.slow
def test_predict_loop_spreads_prompts_over_two_processes(models, prompts, toy):
    _, tokenizer = toy
    options = {"num_samples": 2, "temperature": 1.0, "max_new_tokens": 6, "seed": 3, "require_eos": False}
    one = predict_rejection_samples(models["policy"], models["rm_h"], models["rm_s"], prompts,
                                    tokenizer_path=models["policy"] / "tokenizer.model", prompts_per_batch=1,
                                    trainer_options={"accelerator": "cpu", "devices": 1}, **options)
    two = predict_rejection_samples(models["policy"], models["rm_h"], models["rm_s"], prompts,
                                    tokenizer_path=models["policy"] / "tokenizer.model", prompts_per_batch=1,
                                    trainer_options={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"},
                                    **options)
    assert [(s.index, s.responses, s.best) for s in one] == [(s.index, s.responses, s.best) for s in two]


# ------------------------------------------------------------------------------------ command line
def test_sample_command_writes_kept_samples_the_pool_and_the_training_set(models, toy, tmp_path, capsys):
    from llama2_lit.cli import run_verb

    world, _ = toy
    out = tmp_path / "rs"
    args = [str(models["policy"]), "--rm-helpfulness", str(models["rm_h"]), "--rm-safety", str(models["rm_s"]),
            "--prompts", str(world / "rl_prompts_train.jsonl"), "--out", str(out), "--num-samples", "2",
            "--num-prompts", "3", "--max-new-tokens", "6", "--temperature", "1.0", "--accelerator", "cpu"]
    assert run_verb("sample", [*args, "--keep-unfinished"]) == 0
    assert len(load_records(out / "iteration-1" / "best.jsonl", "chat")) == 3
    assert len(load_records(out / "pool.jsonl", "chat")) == 3
    assert len(load_records(out / "iteration-1" / "train.jsonl", "chat")) == 3
    assert "kept 3" in capsys.readouterr().out
    # A random model never ends within 6 tokens: without --keep-unfinished nothing can be kept.
    assert run_verb("sample", [*args, "--out", str(tmp_path / "none")]) == 2
    assert "no prompt has an eligible sample" in capsys.readouterr().err
    assert not (tmp_path / "none" / "iteration-1" / "best.jsonl").exists()


def test_sample_command_names_the_bad_record(models, tmp_path, capsys):
    from llama2_lit.cli import run_verb

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}], "is_safety": false}\n'
                   '{"messages": [{"role": "user", "content": "Hi"}], "is_safety": "no"}\n')
    status = run_verb("sample", [str(models["policy"]), "--rm-helpfulness", str(models["rm_h"]), "--rm-safety",
                          str(models["rm_s"]), "--prompts", str(bad), "--out", str(tmp_path / "out"),
                          "--temperature", "1.0"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert error == f"llama2-lit sample: error: {bad}, line 2: is_safety: expected true or false, got 'no'"
