"""The report's pure parts: the words it computes from numbers, and sections built from hand-made
numbers (each says what this run shows, and whether the paper's finding came back)."""

from __future__ import annotations

import re

from llama2_lit.report import (
    adherence_section, best_of_k_section, came_back, change, context_distillation_section, finding,
    moved_beyond_noise, pair_kind_lines, ppo_section, rejection_sampling_section, safety_scores_section,
    temperature_section,
)
from llama2_lit.runs import Run


def test_change_says_how_a_number_moved():
    assert change(0.21, 0.8) == "rose from 0.210 to 0.800"
    assert change(0.5, 0.25, digits=2) == "fell from 0.50 to 0.25"
    assert change(0.1234, 0.1232) == "stayed at 0.123"  # equal at the shown precision
    assert change(None, 0.5) == change(float("nan"), 0.5) == "was not measured"
    # with standard errors: beyond noise when the gap exceeds twice the s.e. of the difference
    assert change(0.2, 0.5, before_se=0.03, after_se=0.04) == "rose from 0.200 to 0.500 (beyond noise: 2 s.e. = 0.100)"
    assert change(0.2, 0.25, before_se=0.03, after_se=0.04).endswith("(within noise: 2 s.e. = 0.100)")
    assert change(0.2, 0.2, before_se=0.0, after_se=0.0) == "stayed at 0.200"


def test_moved_beyond_noise_needs_twice_the_standard_error_of_the_difference():
    assert moved_beyond_noise(0.2, 0.5, 0.03, 0.04) == 1  # gap 0.3 > 2 s.e. 0.1
    assert moved_beyond_noise(0.5, 0.2, 0.03, 0.04) == -1
    assert moved_beyond_noise(0.2, 0.29, 0.03, 0.04) == 0
    assert moved_beyond_noise(0.2, 0.5, None, 0.04) is None and moved_beyond_noise(float("nan"), 0.5, 0.1, 0.1) is None


def test_came_back_and_finding():
    assert came_back(True) == "the paper's finding came back"
    assert came_back(False) == "the paper's finding did not come back in this run"
    assert "too few numbers" in came_back(None)
    assert finding("A.", "b.") == "**Paper:** A. **This run:** b."


def test_best_of_k_section_plots_and_reads_fig_7(tmp_path):
    rows = [{"k": 1, "reward_max": 0.3, "reward_median": 0.3, "oracle_max": 0.2, "oracle_median": 0.2,
             "oracle_of_pick": 0.2},
            {"k": 8, "reward_max": 0.6, "reward_median": 0.31, "oracle_max": 0.5, "oracle_median": 0.2,
             "oracle_of_pick": 0.35}]
    text = "\n".join(best_of_k_section({"v1/rs": rows}, tmp_path))
    assert (tmp_path / "best_of_k.png").stat().st_size > 0
    assert "the RM's max rose from 0.300 to 0.600 from K=1 to K=8 while its median rose from 0.300 to 0.310" in text
    assert "RM's pick of 8 at 0.350, against 0.200 for one sample and 0.500 for its own pick" in text
    assert text.endswith("the paper's finding came back.")
    flat = [dict(rows[0]), {**rows[1], "reward_median": 0.7}]  # the median rising as fast as the max: no gap
    assert best_of_k_section({"v1/rs": flat}, tmp_path)[-1].endswith("did not come back in this run.")


def test_temperature_section_reads_the_shift_of_the_optimum(tmp_path):
    def sweep(best: float) -> dict:
        return {"best_temperature": best, "best_temperature_by_oracle": best,
                "at_k": {str(t): {"k": 4, "temperature": t, "reward_max": 1 - abs(t - best), "oracle_of_pick": 0.1}
                         for t in (0.6, 0.8, 1.0)}}

    text = "\n".join(temperature_section({"v1/rs": sweep(0.6), "v2/rs": sweep(1.0)}, {}, tmp_path))
    assert (tmp_path / "temperature.png").stat().st_size > 0
    assert "| v1 | 1.000 | 0.800 | 0.600 | 0.60 | 0.60 |" in text
    assert "the best temperature moved from 0.60 (v1's policy) to 1.00 (v2's); the paper's finding came back." in text
    same = "\n".join(temperature_section({"v1/rs": sweep(0.8), "v2/rs": sweep(0.8)}, {}, tmp_path))
    assert "stayed at 0.80 for every version; the paper's finding did not come back" in same
    fixed = "\n".join(temperature_section({"v1/rs": None}, {"v1/rs": 0.8}, tmp_path))
    assert "No temperature sweep ran" in fixed and "v1 T=0.80" in fixed


def test_adherence_section_reads_table_30_and_the_zero_shot_row():
    adherence = {"ppo": {"trained": {"1": 0.9, "4": 0.2, "6": 0.1}, "lowercase": {"1": 0.5, "4": 0.0, "6": 0.0}},
                 "gatt": {"trained": {"1": 0.9, "4": 0.8, "6": 0.7}, "lowercase": {"1": 0.5, "4": 0.25, "6": 0.5}}}
    text = "\n".join(adherence_section(None, adherence, {"trained": 20, "lowercase": 4, "all": 24}))
    assert "| ppo | 0.900 | 0.200 | 0.100 |" in text and "| gatt | lowercase (n=4) | 0.500 | 0.250 | 0.500 |" in text
    assert ("from ppo to gatt, at turn 4 adherence rose from 0.200 to 0.800; at turn 6 adherence rose from 0.100 to "
            "0.700; the paper's finding came back.") in text
    assert "lowercase adherence at turn 6 rose from 0.000 to 0.500 (n=4 dialogs); the paper's finding came back" in text


def test_safety_scores_section_reads_fig_14(tmp_path):
    scores = {"sft": {"safety": [0.1, 0.1, 0.5, 0.9], "helpfulness": [0.5, 0.5]},
              "ppo": {"safety": [0.1, 0.6, 0.7, 0.9], "helpfulness": [0.5, 0.6]},
              "context distillation": {"safety": [0.7, 0.8, 0.8, 0.9], "helpfulness": [0.5, 0.5]}}
    text = "\n".join(safety_scores_section(scores, tmp_path))
    assert (tmp_path / "safety_scores.png").stat().st_size > 0
    assert "| sft (before RLHF) | 0.400 | 0.500 | 0.500 |" in text
    assert re.search(r"from sft to ppo the mean safety RM score rose from 0\.400 to 0\.575 and the share below 0\.15 "
                     r"fell from 0\.500 to 0\.250, while the helpfulness RM's mean rose from 0\.500 to 0\.550; after "
                     r"context distillation the mean safety RM score is 0\.800 .*; the paper's finding came back\.", text)


def test_context_distillation_section_reads_fig_16b(tmp_path):
    summary = {"prompts": 4, "kept": 2, "mean_gain_kept": 0.2, "dropped_empty_answer": 0,
               "score_without": [0.1, 0.2, 0.8, 0.9], "score_with": [0.4, 0.5, 0.7, 0.8],
               "kept_mask": [True, True, False, False]}
    text = "\n".join(context_distillation_section(summary, {}, tmp_path))
    assert (tmp_path / "context_distillation.png").stat().st_size > 0
    assert ("preferred the distilled answer for 1.000 of the answers scoring below the median (0.800) without the "
            "preprompt, against 0.000 above it; the paper's finding came back.") in text


def test_ppo_section_reads_the_ends_of_noisy_series_not_two_points(tmp_path):
    def run(reward: list[float], oracle: list[float]) -> Run:
        steps = range(len(reward))
        return Run(tmp_path, "ppo", {}, {"ppo/iteration": [(s, float(s)) for s in steps],
                                         "ppo/reward_rc": list(zip(steps, reward)),
                                         "ppo/oracle_helpfulness": list(zip(steps, oracle))})

    # demo-like: the oracle's last point is above its first, but the series swings; the RM reward is flat
    swinging = run([0.94, 0.94, 0.95, 0.945, 0.933, 0.943, 0.924, 0.951, 0.94, 0.941],
                   [0.285, 0.256, 0.34, 0.319, 0.352, 0.413, 0.381, 0.206, 0.323, 0.372])
    text = "\n".join(ppo_section(swinging, tmp_path))
    assert (tmp_path / "ppo.png").stat().st_size > 0
    assert "(the mean of the first 3 against the last 3)" in text and "within noise" in text
    assert text.endswith("the paper's finding did not come back in this run.")
    rising = run([0.50, 0.52, 0.51, 0.60, 0.62, 0.61, 0.70, 0.71, 0.72],
                 [0.30, 0.31, 0.29, 0.30, 0.32, 0.31, 0.33, 0.32, 0.34])
    assert "\n".join(ppo_section(rising, tmp_path)).endswith("the paper's finding came back.")
    hacking = run([0.50, 0.52, 0.51, 0.60, 0.62, 0.61, 0.70, 0.71, 0.72],
                  [0.40, 0.41, 0.40, 0.30, 0.31, 0.30, 0.20, 0.21, 0.20])
    assert "the policy is exploiting the reward models." in "\n".join(ppo_section(hacking, tmp_path))
    assert "too few numbers" in "\n".join(ppo_section(run([0.5, 0.6], [0.3, 0.2]), tmp_path))


def test_ppo_section_flags_a_kl_below_zero_beyond_noise(tmp_path):
    def run(kl: list[float], stderr: list[float]) -> Run:
        steps = range(len(kl))
        return Run(tmp_path, "ppo", {}, {"ppo/iteration": [(s, float(s)) for s in steps],
                                         "ppo/reward_rc": [(s, 0.5) for s in steps],
                                         "ppo/oracle_helpfulness": [(s, 0.3) for s in steps],
                                         "ppo/kl": list(zip(steps, kl)), "ppo/kl_stderr": list(zip(steps, stderr))})

    noisy = "\n".join(ppo_section(run([0.0, -0.025, 0.04, -0.007], [0.0, 0.02, 0.02, 0.01]), tmp_path))
    assert "| KL to π_0 (± s.e.) | 0.000 ± 0.000 | -0.025 ± 0.020 |" in noisy
    assert "non-negative within noise (above -2 s.e.) at every iteration" in noisy
    broken = "\n".join(ppo_section(run([0.0, -0.5, 0.04, -0.3], [0.0, 0.02, 0.02, 0.1]), tmp_path))
    assert "below 0 by more than 2 s.e. at iteration(s) 1, 3**" in broken


def test_rejection_sampling_section_counts_a_rise_within_noise_as_no_finding():
    from llama2_lit.report import SUITES

    rs = {"v1/rs": {"num_samples": 8, "temperature": 1.2, "prompts": 128, "kept": 127, "pool": 127, "train": 127,
                    "train_from_earlier_iterations": 0, "reward_kept_mean": 0.9, "reward_sample_mean": 0.8,
                    "oracle_of_pick": 0.35, "oracle_mean": 0.34, "oracle_of_oracle_pick": 0.63}}

    def models(after: float) -> dict:
        return {"sft": {SUITES[0]: {"helpfulness": 0.071, "helpfulness_se": 0.02}},
                "rejection sampling V1": {SUITES[0]: {"helpfulness": after, "helpfulness_se": 0.02}}}

    within = "\n".join(rejection_sampling_section(rs, models(0.085)))  # the demo's +0.014, 2 s.e. = 0.057
    assert "(within noise: 2 s.e. = 0.057)" in within and within.endswith("did not come back in this run.")
    beyond = "\n".join(rejection_sampling_section(rs, models(0.2)))
    assert beyond.endswith("the paper's finding came back.")


def test_pair_kind_lines_list_the_weakest_kind_first():
    lines = pair_kind_lines("v2/rm_helpfulness", {"concise / rambling": {"accuracy": 0.34, "pairs": 61},
                                                  "concise / refusal": {"accuracy": 0.86, "pairs": 22},
                                                  "concise / wrong": {"accuracy": 0.5, "pairs": 46}})
    rows = [line for line in lines if line.startswith("| concise")]
    assert rows == ["| concise / rambling | 61 | 0.340 |", "| concise / wrong | 46 | 0.500 |",
                    "| concise / refusal | 22 | 0.860 |"]
    assert pair_kind_lines("v1/rm_helpfulness", {}) == []
