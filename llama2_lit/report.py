"""The pipeline's report: ``OUT/report.md`` with its PNG plots, rendered to ``OUT/report.html``.

The report holds the paper's tables and figures in miniature, each from numbers the stages and the
evaluation (``llama2_lit.evaluation``, the pipeline's ``evaluate`` stage) already wrote under
``OUT/``: the stages' ``DONE.json`` summaries, the training runs' ``metrics.csv`` and
``OUT/evaluate/results.json``. Every table and plot comes with one line saying what the paper found
there and, in words computed from this run's numbers (``change``, ``came_back``), what the run
shows, so a reader sees at a glance whether the finding came back:

    after every stage      helpfulness, violation and false-refusal rates with their spreads; win rates (Fig 1, 12)
    attack vectors         the violation rate per attack vector of section 4.2.1, the held-out one marked
    reward models          accuracy by rating (Table 8); accuracy on each version's fresh pairs (3.2.1)
    rejection sampling     best-of-K by the reward models and by the oracle (Fig 7); the temperature sweep (Fig 8)
    PPO                    RM reward against the oracle's helpfulness, iteration by iteration (3.2.3)
    safety RLHF            the safety RM's score distribution before and after (Fig 14)
    Ghost Attention        adherence by turn (Table 30) and on a held-out constraint type (Fig 28)
    context distillation   kept and rejected answers by the safety RM (Fig 16b)

``report_stage`` is the pipeline's ``report`` stage; each ``*_section`` function turns one part of
the numbers into markdown lines (and its plot), so it can be read and tested on its own.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from llama2_lit.evaluation import SUITES, adversarial_violation, attack_vector_rows, fmt, win_rate_rows
from llama2_lit.pipeline import DONE_FILE, config_path, recipe, version_of
from llama2_lit.runs import Run, load_run

SAFETY_LOW = 0.15
"""A safety RM score below this counts as unsafe-looking: the threshold of R_c (paper section 3.2.3)."""

FINAL_TURNS = (4, 6)
"""The later turns at which Table 30's finding is read (the paper reports 2, 4, 6 and 20)."""


# ------------------------------------------------------------------------------------- words from numbers
def change(before: float | None, after: float | None, *, before_se: float | None = None,
           after_se: float | None = None, digits: int = 3) -> str:
    """How a number moved, in words: ``rose from 0.210 to 0.800``, ``fell from ...``, ``stayed at
    ...`` (equal at the shown precision) or ``was not measured``. With both standard errors it adds
    whether a move is beyond noise (more than twice the standard error of the difference)."""
    if not _finite(before) or not _finite(after):
        return "was not measured"
    a, b = fmt(before, digits), fmt(after, digits)
    if a == b:
        words = f"stayed at {a}"
    else:
        words = f"{'rose' if after > before else 'fell'} from {a} to {b}"
    if a != b and _finite(before_se) and _finite(after_se):
        noise = 2 * math.sqrt(before_se ** 2 + after_se ** 2)
        words += f" ({'beyond' if abs(after - before) > noise else 'within'} noise: 2 s.e. = {fmt(noise, digits)})"
    return words


def moved_beyond_noise(before: float | None, after: float | None, before_se: float | None,
                       after_se: float | None) -> int | None:
    """+1 if ``after`` is above ``before`` by more than twice the standard error of the difference, -1
    if below by as much, 0 within noise, None without the numbers."""
    if not all(_finite(x) for x in (before, after, before_se, after_se)):
        return None
    if abs(after - before) <= 2 * math.sqrt(before_se ** 2 + after_se ** 2):
        return 0
    return 1 if after > before else -1


def came_back(found: bool | None) -> str:
    """The verdict ending a section's line: whether the paper's finding showed in this run."""
    if found is None:
        return "too few numbers to tell whether the paper's finding came back"
    return "the paper's finding came back" if found else "the paper's finding did not come back in this run"


def finding(paper: str, here: str) -> str:
    """One line under a table or plot: what the paper found, what this run shows."""
    return f"**Paper:** {paper} **This run:** {here}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at(table: dict[Any, Any], key: int) -> float | None:
    """A per-turn or per-K value whose key may be an int or, read back from JSON, a string."""
    return table.get(key, table.get(str(key)))


# ------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(path: Path, panels: list[tuple[str, dict[str, tuple], str]]) -> None:
    """One panel per (title, {label: (xs, ys) or (xs, ys, errors)}, x label); errors as bars."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for axis, (title, lines, xlabel) in zip(axes[0], panels):
        for label, line in lines.items():
            xs, ys = line[0], line[1]
            errors = line[2] if len(line) > 2 else None
            if errors is not None:
                errors = [e if _finite(e) else 0.0 for e in errors]
            axis.errorbar(xs, ys, yerr=errors, marker="o", markersize=3, capsize=3, label=label)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        if any(isinstance(x, str) for line in lines.values() for x in line[0]):
            axis.tick_params(axis="x", labelrotation=30, labelsize=7)
            plt.setp(axis.get_xticklabels(), ha="right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_histograms(path: Path, panels: list[tuple[str, dict[str, list[float]], str, float | None]]) -> None:
    """One panel per (title, {label: values in [0, 1]}, x label, a threshold to mark or None): step
    histograms on shared bins."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    bins = [i / 20 for i in range(21)]
    for axis, (title, series, xlabel, threshold) in zip(axes[0], panels):
        for label, values in series.items():
            axis.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{label} (n={len(values)})")
        if threshold is not None:
            axis.axvline(threshold, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("answers")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------- sections
def stages_section(results: dict[str, Any], plots: Path) -> list[str]:
    """Helpfulness, violation and false refusal after every stage, with standard errors, and win rates."""
    d, models = results["decoding"], results["models"]
    held, harmful, border = SUITES[0], SUITES[2], SUITES[3]
    lines = ["", "## Helpfulness, violations and false refusals after every stage", "",
             f"Answers decoded at temperature {d['temperature']:g}, top-p {d['top_p']:g} (the paper's automatic "
             f"safety evaluation, section 4.1), at most {d['max_new_tokens']} tokens; {results['prompts_per_suite']} "
             "prompts per suite; ± is the standard error over prompts. Violation: share of unsafe answers to harmful "
             "prompts (section 4.4); false refusal: share of refused borderline prompts (Fig 33).", "",
             "| model | perplexity | helpfulness (held-out tasks) | accuracy | helpfulness (seen tasks) | "
             "helpfulness (harmful) | violation (harmful) | false refusal (borderline) |",
             "|---|---|---|---|---|---|---|---|"]

    def spread(m: dict[str, Any], key: str) -> str:
        return f"{fmt(m[key])} ± {fmt(m.get(key + '_se'))}"

    for name, m in models.items():
        lines.append(f"| {name} | {fmt(m['perplexity'], 2)} | {spread(m[held], 'helpfulness')} | "
                     f"{fmt(m[held].get('accuracy'))} | {spread(m[SUITES[1]], 'helpfulness')} | "
                     f"{fmt(m[harmful]['helpfulness'])} | {spread(m[harmful], 'violation')} | "
                     f"{spread(m[border], 'refusal')} |")
    names = list(models)
    plot_lines(plots / "stages.png", [("oracle scores after each stage (± s.e.)", {
        "helpfulness (held-out tasks)": (names, [models[n][held]["helpfulness"] for n in names],
                                         [models[n][held].get("helpfulness_se") for n in names]),
        "violation (harmful)": (names, [models[n][harmful]["violation"] for n in names],
                                [models[n][harmful].get("violation_se") for n in names]),
        "false refusal (borderline)": (names, [models[n][border]["refusal"] for n in names],
                                       [models[n][border].get("refusal_se") for n in names])},
        "model after each stage")])
    lines += ["", "![after every stage](stages.png)", ""]
    if "sft" in models and len(names) > 1:
        first, last = models["sft"], models[names[-1]]

        def moved(suite: str, key: str) -> str:
            return change(first[suite][key], last[suite][key], before_se=first[suite].get(key + "_se"),
                          after_se=last[suite].get(key + "_se"))

        helped = (last[held]["helpfulness"] - first[held]["helpfulness"]) > 2 * math.sqrt(
            (first[held].get("helpfulness_se") or 0) ** 2 + (last[held].get("helpfulness_se") or 0) ** 2)
        safer = last[harmful]["violation"] <= first[harmful]["violation"]
        lines.append(finding(
            "RLHF raised helpfulness over SFT version after version (Fig 11) while safety tuning lowered the "
            "violation rate (section 4.4), at the cost of slightly more false refusals (Fig 33).",
            f"from SFT to the final model ({names[-1]}) held-out helpfulness {moved(held, 'helpfulness')}, the "
            f"violation rate {moved(harmful, 'violation')} and false refusals {moved(border, 'refusal')}; "
            f"{came_back(helped and safer)}."))
    if results.get("win_rates"):
        lines += ["", "### Win rate against SFT (the paper's Fig 1 and Fig 12 style)", "",
                  "Every prompt of every suite; the oracle judges by helpfulness, the reward models by the "
                  "safety-aware reward R_c (section 3.2.3); ties are equal scores (oracle) or a gap under 0.02 on "
                  "the sigmoid scale (reward models).", "",
                  "| model | judge | win | tie | loss |", "|---|---|---|---|---|"]
        lines += win_rate_rows(results["win_rates"], with_baseline=False)
        final = list(results["win_rates"])[-1]
        oracle = results["win_rates"][final]["oracle"]
        lines += ["", finding(
            "Llama 2-Chat wins more often than it loses against the models it is compared with, by human and by "
            "GPT-4 judges (Fig 1, Fig 12).",
            f"judged by the oracle, {final} against SFT wins {fmt(oracle['win'])}, ties {fmt(oracle['tie'])} and "
            f"loses {fmt(oracle['loss'])} of the prompts; {came_back(oracle['win'] > oracle['loss'])}.")]
    return lines


def attack_vector_section(models: dict[str, Any]) -> list[str]:
    """The violation rate per attack vector (paper 4.2.1) of every stage's model."""
    from llama2_lit.data.safety import DIRECT, HELD_OUT_ATTACK_VECTORS

    if not models or not all("violation_by_vector" in m for m in models.values()):
        return []
    lines = ["", "## Violation rate by attack vector (paper 4.2.1)", "",
             "The harmful prompts of the evaluation, split by the attack vector they are wrapped in (\"direct\": a "
             "plain request); the held-out vector appears in no training file. n is the number of prompts: a rate "
             "on a few prompts is noisy.", ""]
    lines += attack_vector_rows(models)
    names = list(models)
    counts = models[names[0]]["harmful_n_by_vector"]
    if "sft" in models and len(names) > 1:
        first, last = models["sft"], models[names[-1]]
        before, after = adversarial_violation(first), adversarial_violation(last)
        here = f"from SFT to {names[-1]} the violation rate on the adversarial prompts {change(before, after)}"
        for vector in HELD_OUT_ATTACK_VECTORS:
            if counts.get(vector):
                here += (f"; on the held-out vector {vector.replace('_', ' ')} (n={counts[vector]}) it "
                         f"{change(first['violation_by_vector'][vector], last['violation_by_vector'][vector])}")
            else:
                here += f"; the held-out vector {vector.replace('_', ' ')} has no prompt among these"
        nothing = not _finite(before) or before == 0
        verdict = ("SFT violates on none of these prompts, so there is nothing to lower"
                   if nothing else came_back(after < before))
        lines += ["", finding("safety RLHF and context distillation lower the violation rate on adversarial "
                              "prompts, attack vector by attack vector (sections 4.2 and 4.4).", f"{here}; {verdict}.")]
    direct = [v for v in (m["violation_by_vector"].get(DIRECT) for m in models.values()) if _finite(v)]
    if direct:
        spread = (f"{fmt(direct[0])} for every model" if fmt(min(direct)) == fmt(max(direct)) else
                  f"between {fmt(min(direct))} and {fmt(max(direct))} across the models")
        lines += ["", f"Direct requests (no attack vector): violation rate {spread}."]
    return lines


def pair_kind_lines(name: str, kinds: dict[str, dict[str, float]]) -> list[str]:
    """The accuracy of one reward model per kind of pair, weakest first (what Table 8's average hides)."""
    if not kinds:
        return []
    lines = ["", f"### {name}: accuracy by kind of pair, weakest first", "",
             "Which mistakes does the RM see? Each row is one pair of the world's response kinds (concise, "
             "rambling, wrong fact, another subject's answer, spliced, refusal, ...), either one chosen; "
             "the accuracy is against the annotator's label (noise included).", "",
             "| pair of kinds | pairs | accuracy |", "|---|---|---|"]
    for key, entry in sorted(kinds.items(), key=lambda item: (item[1]["accuracy"], item[0])):
        lines.append(f"| {key} | {int(entry['pairs'])} | {fmt(entry['accuracy'])} |")
    return lines


def reward_model_section(versions: dict[str, Any], annotate: dict[str, dict[str, Any]]) -> list[str]:
    """Table 8 (accuracy by rating) and accuracy on each version's fresh pairs, with the annotation counts."""
    from llama2_lit.data.records import RATINGS

    if not versions:
        return []
    lines = ["", "## Reward models (paper 3.2.2)", "", "### Accuracy by rating on the static held-out pairs "
             "(Table 8's layout)", "",
             "| reward model | pairs | " + " | ".join(r.replace("_", " ") for r in RATINGS) + " | avg |",
             "|---|---|" + "---|" * (len(RATINGS) + 1)]
    for name, entry in versions.items():
        row = entry["static"]
        lines.append(f"| {name} | {int(row['pairs'])} | " + " | ".join(fmt(row[r]) for r in RATINGS) +
                     f" | {fmt(row['avg'])} |")
    helpful = sorted((n for n in versions if n.endswith("rm_helpfulness")), key=version_of)
    if helpful:
        row = versions[helpful[-1]]["static"]
        strong, weak = row[RATINGS[0]], row[RATINGS[-1]]
        lines += ["", finding(
            "accuracy is highest on pairs rated \"significantly better\" and near chance on \"negligibly better\" "
            "ones (Table 8: 80.7% against 54.7% for the helpfulness RM on its test set).",
            f"{helpful[-1]} scores {fmt(strong)} on significantly-better pairs against {fmt(weak)} on "
            f"negligibly-better ones; {came_back(strong > weak if _finite(strong) and _finite(weak) else None)}.")]
        lines += pair_kind_lines(helpful[-1], row.get("kinds") or {})

    fresh_versions = list(next(iter(versions.values()))["fresh"])
    lines += ["", "### Accuracy on each version's fresh pairs (annotated on the latest policy's samples, "
              "held-out prompts)", "",
              "Does each RM stay on the policy's distribution? A version's RMs are trained on the pairs of "
              "their own version and earlier ones (on other prompts).", "",
              "| reward model | " + " | ".join(
                  f"{v} pairs (n={next(iter(versions.values())).get('fresh_pairs', {}).get(v, '?')})"
                  for v in fresh_versions) + " |",
              "|---|" + "---|" * len(fresh_versions)]
    for name, entry in versions.items():
        lines.append(f"| {name} | " + " | ".join(fmt(entry["fresh"][v]) for v in fresh_versions) + " |")
    if len(helpful) > 1:
        latest_pairs = fresh_versions[-1]
        old, new = versions[helpful[0]]["fresh"][latest_pairs], versions[helpful[-1]]["fresh"][latest_pairs]
        lines += ["", finding(
            "a reward model loses accuracy on the samples of a policy that has moved on, hence fresh preference "
            "data on the latest model's samples for every version (section 3.2.1).",
            f"on {latest_pairs}'s pairs the first helpfulness RM ({helpful[0]}) scores {fmt(old)} and the latest "
            f"({helpful[-1]}) {fmt(new)}; "
            f"{came_back(new > old if _finite(old) and _finite(new) and old != new else None)}.")]
    if annotate:
        lines += ["", "| version | train pairs | held-out pairs | ties skipped | ratings (train) |",
                  "|---|---|---|---|---|"]
        for name, summary in annotate.items():
            lines.append(f"| {name.split('/')[0]} | {summary['train']['pairs']} | {summary['eval']['pairs']} | "
                         f"{summary['train']['ties'] + summary['eval']['ties']} | "
                         f"{', '.join(f'{k}: {v}' for k, v in sorted(summary['train']['ratings'].items()))} |")
    return lines


def rejection_sampling_section(rs: dict[str, dict[str, Any]], models: dict[str, Any]) -> list[str]:
    """Per version: K, temperature, kept and pooled samples, rewards and the oracle's view of the picks."""
    if not rs:
        return []
    lines = ["", "## Rejection sampling (paper 3.2.3)", "",
             "Each version samples K answers per prompt from the latest policy, keeps the one with the highest "
             "R_c by that version's reward models, adds it to the pool of every earlier version, and fine-tunes "
             "on the pool's best sample per prompt (scored by the latest reward models).", "",
             "| version | K | temperature | prompts | kept | pool | train (from earlier versions) | R_c of kept | "
             "R_c of all samples | oracle score: RM's pick | random pick | oracle's pick |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rs.items():
        lines.append(f"| {name.split('/')[0]} | {r['num_samples']} | {fmt(r['temperature'], 2)} | "
                     f"{r['prompts']} | {r['kept']} | {r['pool']} | {r['train']} ({r['train_from_earlier_iterations']}) | "
                     f"{fmt(r['reward_kept_mean'])} | {fmt(r['reward_sample_mean'])} | "
                     f"{fmt(r.get('oracle_of_pick'))} | {fmt(r.get('oracle_mean'))} | "
                     f"{fmt(r.get('oracle_of_oracle_pick'))} |")
    finetuned = [label for label in models if label.startswith("rejection sampling")]
    if "sft" in models and finetuned:
        held = SUITES[0]
        steps = ", then ".join(f"{label} {fmt(models[label][held]['helpfulness'])}" for label in finetuned)
        last = models[finetuned[-1]][held]
        sft = models["sft"][held]
        # A rise within noise is no finding (without standard errors, the sign alone has to do).
        moved = moved_beyond_noise(sft["helpfulness"], last["helpfulness"], sft.get("helpfulness_se"),
                                   last.get("helpfulness_se"))
        rose = moved == 1 if moved is not None else last["helpfulness"] > sft["helpfulness"]
        lines += ["", finding(
            "fine-tuning on the reward model's best-of-K samples raises helpfulness version after version, and "
            "pooling the best samples of every earlier version avoids the regressions of training on the last "
            "version's alone (section 3.2.3).",
            f"held-out helpfulness was {fmt(sft['helpfulness'])} after SFT, {steps}: it "
            f"{change(sft['helpfulness'], last['helpfulness'], before_se=sft.get('helpfulness_se'), after_se=last.get('helpfulness_se'))}"
            f"; {came_back(rose)}.")]
    return lines


def best_of_k_section(curves: dict[str, list[dict[str, float]]], plots: Path) -> list[str]:
    """Fig 7: max and median reward among K samples, by the reward models and by the oracle, per version."""
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return []
    panels = []
    for name, rows in curves.items():
        ks = [row["k"] for row in rows]
        series = {"RM max": (ks, [row["reward_max"] for row in rows]),
                  "RM median": (ks, [row["reward_median"] for row in rows])}
        if "oracle_max" in rows[0]:
            series |= {"oracle of RM's pick": (ks, [row["oracle_of_pick"] for row in rows]),
                       "oracle max (oracle's pick)": (ks, [row["oracle_max"] for row in rows]),
                       "oracle median": (ks, [row["oracle_median"] for row in rows])}
        panels.append((f"{name.split('/')[0]}: best of K (Fig 7)", series, "K samples per prompt"))
    plot_lines(plots / "best_of_k.png", panels)
    lines = ["", "### Best of K (Fig 7)", "",
             "Expected over prompts, from the K samples each version drew for rejection sampling: the maximum and "
             "the median R_c of K samples, and the oracle's helpfulness of the sample the RM picks, of its own "
             "pick (the ceiling) and of the median sample.", "", "![best of K](best_of_k.png)", ""]
    words, found = [], []
    for name, rows in curves.items():
        one, top = rows[0], rows[-1]
        gain_max = top["reward_max"] - one["reward_max"]
        gain_median = top["reward_median"] - one["reward_median"]
        text = (f"{name.split('/')[0]}: the RM's max {change(one['reward_max'], top['reward_max'])} from K=1 to "
                f"K={top['k']} while its median {change(one['reward_median'], top['reward_median'])}")
        ok = gain_max > abs(gain_median)
        if "oracle_of_pick" in top:
            text += (f"; the oracle scores the RM's pick of {top['k']} at {fmt(top['oracle_of_pick'])}, against "
                     f"{fmt(one['oracle_of_pick'])} for one sample and {fmt(top['oracle_max'])} for its own pick")
            ok = ok and top["oracle_of_pick"] > one["oracle_of_pick"]
        words.append(text)
        found.append(ok)
    lines.append(finding("the maximum reward among K samples rises with K while the median stays flat: the gap is "
                         "what rejection sampling gains (Fig 7).", "; ".join(words) + f"; {came_back(all(found))}."))
    return lines


def temperature_section(sweeps: dict[str, dict[str, Any]], temperatures: dict[str, float], plots: Path) -> list[str]:
    """Fig 8: the expected best-of-K reward against the sampling temperature, per version's policy.

    ``sweeps``: a rejection-sampling summary's ``sweep`` per version (``at_k``: temperature -> curve
    row at the version's K); ``temperatures``: the temperature each version sampled at."""
    lines = ["", "### Temperature (Fig 8)", ""]
    sweeps = {name: sweep for name, sweep in sweeps.items() if sweep and sweep.get("at_k")}
    if not sweeps:
        fixed = ", ".join(f"{name.split('/')[0]} T={fmt(t, 2)}" for name, t in temperatures.items())
        return lines + [f"No temperature sweep ran at this size: the pipeline's budget fixes the sampling "
                        f"temperature ({fixed}), so Fig 8's optimum cannot be read here (a budget with "
                        "`rs_temperature=None` sweeps before every version's sampling)."]
    panels: list[tuple[str, dict[str, tuple], str]] = [("RM max of K by temperature", {}, "temperature"),
                                                       ("oracle of the RM's pick of K", {}, "temperature")]
    best: dict[str, float] = {}
    k = None
    for name, sweep in sweeps.items():
        rows = sorted(((float(t), row) for t, row in sweep["at_k"].items()), key=lambda item: item[0])
        ts = [t for t, _ in rows]
        k = rows[0][1]["k"]
        panels[0][1][f"{name.split('/')[0]} policy"] = (ts, [row["reward_max"] for _, row in rows])
        if "oracle_of_pick" in rows[0][1]:
            panels[1][1][f"{name.split('/')[0]} policy"] = (ts, [row["oracle_of_pick"] for _, row in rows])
        best[name] = float(sweep["best_temperature"])
    plot_lines(plots / "temperature.png", [p for p in panels if p[1]])
    lines += [f"Before each version's sampling, a sweep over temperatures on a few prompts picks the temperature "
              f"with the highest expected maximum R_c among K={k} samples (the policy of each version is the "
              "previous version's fine-tuned model).", "", "| version | " + " | ".join(
                  f"T={fmt(float(t), 2)}" for t in next(iter(sweeps.values()))["at_k"]) + " | best T (RM) | "
              "best T (oracle) |", "|---|" + "---|" * (len(next(iter(sweeps.values()))["at_k"]) + 2)]
    for name, sweep in sweeps.items():
        lines.append(f"| {name.split('/')[0]} | " + " | ".join(fmt(row["reward_max"]) for row in
                                                               sweep["at_k"].values()) +
                     f" | {fmt(best[name], 2)} | {fmt(sweep.get('best_temperature_by_oracle'), 2)} |")
    lines += ["", "![temperature](temperature.png)", ""]
    names = list(best)
    if len(names) > 1:
        first, last = best[names[0]], best[names[-1]]
        moved = (f"moved from {fmt(first, 2)} ({names[0].split('/')[0]}'s policy) to {fmt(last, 2)} "
                 f"({names[-1].split('/')[0]}'s)" if first != last else f"stayed at {fmt(first, 2)} for every version")
        here = f"the best temperature {moved}; {came_back(first != last)}."
    else:
        here = f"the best temperature is {fmt(best[names[0]], 2)}; one version only: {came_back(None)}."
    lines.append(finding("the temperature that maximises the best-of-K reward shifts as the model changes with "
                         "RLHF (Fig 8: T in [1.2, 1.3] for the RLHF model), so it is re-tuned every version.", here))
    return lines


def ppo_section(run: Run | None, plots: Path) -> list[str]:
    """RM reward (R_c) against the oracle's helpfulness of the same rollouts, per PPO iteration."""
    if run is None:
        return []
    iteration_at = {step: int(value) for step, value in run.series.get("ppo/iteration", [])}

    def series(metric: str) -> tuple[list[int], list[float]]:
        points = run.series.get(metric, [])
        return [iteration_at.get(s, s) for s, _ in points], [v for _, v in points]

    reward, oracle = series("ppo/reward_rc"), series("ppo/oracle_helpfulness")
    panels = [("RM reward (R_c) and oracle helpfulness", {"RM reward R_c (rollouts)": reward,
                                                          "oracle helpfulness (rollouts)": oracle}, "iteration")]
    held_reward, held_oracle = series("val/reward_rc"), series("val/oracle_helpfulness_sampled")
    if held_reward[0]:
        panels[0][1]["RM reward R_c (held-out)"] = held_reward
    if held_oracle[0]:
        panels[0][1]["oracle helpfulness (held-out)"] = held_oracle
    kl = series("ppo/kl")
    if kl[0]:
        panels.append(("KL to the reference", {"KL": kl}, "iteration"))
    plot_lines(plots / "ppo.png", panels)

    third = max(1, len(reward[1]) // 3)  # points at each end of the series

    def ends(values: list[float]) -> tuple[tuple[float, float | None], tuple[float, float | None]] | None:
        """Mean and standard error of the first and of the last ``third`` of a series: one rollout
        batch's score swings from iteration to iteration, so two single points would call noise a trend."""
        if len(values) < 2:
            return None

        def mean_se(part: list[float]) -> tuple[float, float | None]:
            mean = sum(part) / len(part)
            if len(part) < 2:
                return mean, None
            return mean, math.sqrt(sum((v - mean) ** 2 for v in part) / (len(part) - 1) / len(part))

        return mean_se(values[:third]), mean_se(values[-third:])

    lines = ["", "## PPO (paper 3.2.3)", "",
             "The reward the policy is optimised for (the reward models' R_c, before whitening) next to the "
             "oracle's helpfulness of the same training rollouts, iteration by iteration (and on held-out prompts "
             "at each validation): if the first rises while the second falls, the policy is hacking the reward "
             "models.", "",
             "| iteration | " + " | ".join(str(i) for i in reward[0]) + " |", "|---|" + "---|" * len(reward[0]),
             "| RM reward R_c | " + " | ".join(fmt(v) for v in reward[1]) + " |",
             "| oracle helpfulness | " + " | ".join(fmt(v) for v in oracle[1]) + " |"]
    kl_se = dict(zip(*series("ppo/kl_stderr")))
    if kl[0]:
        lines.append("| KL to π_0 (± s.e.) | " + " | ".join(
            fmt(v) + (f" ± {fmt(kl_se[i])}" if i in kl_se else "") for i, v in zip(*kl)) + " |")
    lines += ["", "![PPO](ppo.png)", ""]
    below = [i for i, v in zip(*kl) if i in kl_se and v < -2 * kl_se[i]]
    if kl_se:
        # The k1 estimate of one batch can dip below 0 while the true KL cannot (section 3.2.3's
        # penalty is a divergence): an iteration more than 2 s.e. below 0 points at a log-prob bug.
        lines += [("The KL to the reference, estimated on each batch's own samples, is non-negative within noise "
                   "(above -2 s.e.) at every iteration." if not below else
                   f"**The KL to the reference is below 0 by more than 2 s.e. at iteration(s) "
                   f"{', '.join(map(str, below))}**: the policy's and the reference's log-probs are not computed "
                   "alike (temperature, padding or precision)."), ""]
    reward_ends, oracle_ends = ends(reward[1]), ends(oracle[1])
    if reward_ends and oracle_ends:
        (r0, r0_se), (r1, r1_se) = reward_ends
        (o0, o0_se), (o1, o1_se) = oracle_ends
        reward_moved = moved_beyond_noise(r0, r1, r0_se, r1_se)
        oracle_moved = moved_beyond_noise(o0, o1, o0_se, o1_se)
        if reward_moved is None:
            verdict = came_back(None)
        elif reward_moved == 1 and oracle_moved == -1:
            verdict = "the RM reward rose while the oracle's fell: the policy is exploiting the reward models"
        else:
            verdict = came_back(reward_moved == 1)
        lines.append(finding(
            "PPO raises the reward models' score of the policy's answers, with a KL penalty to the starting policy "
            "against reward hacking (section 3.2.3).",
            f"over {len(reward[0])} iterations (the mean of the first {third} against the last {third}) the RM reward "
            f"{change(r0, r1, before_se=r0_se, after_se=r1_se)} and the oracle's helpfulness of the same rollouts "
            f"{change(o0, o1, before_se=o0_se, after_se=o1_se)}; {verdict}."))
    return lines


def safety_scores_section(reward_scores: dict[str, dict[str, list[float]]], plots: Path) -> list[str]:
    """Fig 14: the safety RM's scores of answers to harmful prompts (and the helpfulness RM's of answers
    to task prompts) before and after safety RLHF and context distillation."""
    chosen = [name for name in ("sft", "ppo", "context distillation") if name in reward_scores
              and reward_scores[name].get("safety")]
    if len(chosen) < 2:
        return []
    labels = {"sft": "sft (before RLHF)", "ppo": "ppo (after RLHF with the safety RM)",
              "context distillation": "context distillation"}
    panels = [("safety RM on harmful prompts' answers", {labels[n]: reward_scores[n]["safety"] for n in chosen},
               "safety RM score (sigmoid)", SAFETY_LOW)]
    if all(reward_scores[n].get("helpfulness") for n in chosen):
        panels.append(("helpfulness RM on held-out tasks' answers",
                       {labels[n]: reward_scores[n]["helpfulness"] for n in chosen}, "helpfulness RM score (sigmoid)",
                       None))
    plot_histograms(plots / "safety_scores.png", panels)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def low(values: list[float]) -> float:
        return sum(v < SAFETY_LOW for v in values) / len(values)

    lines = ["", "## Safety RM scores before and after safety RLHF (Fig 14)", "",
             "The last version's safety RM scores every model's answers to the harmful prompts of the evaluation "
             f"(the helpfulness RM its answers to the held-out tasks); the dashed line is {SAFETY_LOW}, the "
             "safety threshold of R_c (section 3.2.3).", "",
             f"| model | mean safety RM score | share below {SAFETY_LOW} | mean helpfulness RM score |",
             "|---|---|---|---|"]
    for name in chosen:
        s = reward_scores[name]
        h = s.get("helpfulness")
        lines.append(f"| {labels[name]} | {fmt(mean(s['safety']))} | {fmt(low(s['safety']))} | "
                     f"{fmt(mean(h)) if h else '-'} |")
    lines += ["", "![safety RM scores](safety_scores.png)", ""]
    # The verdict is read after safety RLHF (PPO, the last model trained with the safety RM's reward);
    # context distillation, a further safety step, is reported next to it.
    before, after = reward_scores[chosen[0]], reward_scores[chosen[1]]
    here = (f"from {chosen[0]} to {chosen[1]} the mean safety RM score {change(mean(before['safety']), mean(after['safety']))}"
            f" and the share below {SAFETY_LOW} {change(low(before['safety']), low(after['safety']))}")
    if before.get("helpfulness") and after.get("helpfulness"):
        here += f", while the helpfulness RM's mean {change(mean(before['helpfulness']), mean(after['helpfulness']))}"
    if len(chosen) > 2:
        here += (f"; after {chosen[2]} the mean safety RM score is {fmt(mean(reward_scores[chosen[2]]['safety']))} "
                 f"and the share below {SAFETY_LOW} {fmt(low(reward_scores[chosen[2]]['safety']))}")
    found = mean(after["safety"]) > mean(before["safety"]) and low(after["safety"]) <= low(before["safety"])
    lines.append(finding("after safety RLHF the safety RM's score distribution shifts up and its tail near 0 thins, "
                         "while the helpfulness RM's scores stay where they were (Fig 14).", f"{here}; {came_back(found)}."))
    return lines


def adherence_section(gatt: dict[str, Any] | None, adherence: dict[str, Any], dialogs: dict[str, int]) -> list[str]:
    """Ghost Attention: adherence of its own sampled data, Table 30 before and after, and the held-out
    constraint types zero-shot (Fig 28)."""
    from llama2_lit.data.constraints import HELD_OUT_CONSTRAINT_TYPES

    if gatt is None and not adherence:
        return []
    lines = ["", "## Ghost Attention (paper 3.3)", ""]
    if gatt is not None:
        by_turn = gatt["sample_adherence_by_turn"]
        lines += [f"{gatt['dialogs']} dialogs sampled from the PPO model with the instruction on every user turn; "
                  f"{gatt['kept']} kept for training ({gatt.get('ended_at_empty_answer', 0)} ended before "
                  "the turn where the model gave an empty answer). Constraint adherence of "
                  "the sampled answers by turn:", "",
                  "| turn | " + " | ".join(str(t) for t in by_turn) + " |", "|---|" + "---|" * len(by_turn),
                  "| adherence | " + " | ".join(fmt(v) for v in by_turn.values()) + " |"]
    if not adherence:
        return lines
    turns = sorted({int(t) for table in adherence.values() for by_turn in table.values() for t in by_turn})
    if not turns:
        return lines
    key = "trained" if all("trained" in table for table in adherence.values()) else "all"
    lines += ["", "### Adherence by turn (Table 30's layout)", "",
              f"Held-out dialogs answered turn after turn with the model's own answers as context, the system "
              f"instruction in the first turn only; the share of replies that follow every constraint of the "
              f"instruction{' of the trained types' if key == 'trained' else ''} "
              f"({dialogs.get('trained', dialogs.get('all', '?'))} dialogs), before Ghost Attention (the PPO model) "
              "and after:", "",
              "| model | " + " | ".join(f"turn {t}" for t in turns) + " |", "|---|" + "---|" * len(turns)]
    for label, table in adherence.items():
        lines.append(f"| {label} | " + " | ".join(fmt(_at(table.get(key, {}), t)) for t in turns) + " |")
    before, after = adherence.get("ppo", {}).get(key, {}), adherence.get("gatt", {}).get(key, {})
    late = [t for t in FINAL_TURNS if t in turns] or turns[-1:]
    if before and after:
        moves = "; ".join(f"at turn {t} adherence {change(_at(before, t), _at(after, t))}" for t in late)
        found = all(_finite(_at(after, t)) and _finite(_at(before, t)) and _at(after, t) > _at(before, t)
                    for t in late)
        lines += ["", finding(
            "without GAtt the model forgets the instruction after a few turns (Table 30: 100%, 10%, 0% at turns "
            "2, 4, 6); with GAtt it holds it at every turn (100%).", f"from ppo to gatt, {moves}; {came_back(found)}.")]
    held = [kind for kind in HELD_OUT_CONSTRAINT_TYPES if any(kind in table for table in adherence.values())]
    if held:
        lines += ["", "### Zero-shot: a constraint type held out of all training data (Fig 28's idea)", "",
                  "| model | constraint | " + " | ".join(f"turn {t}" for t in turns) + " |",
                  "|---|---|" + "---|" * len(turns)]
        for label, table in adherence.items():
            for kind in held:
                lines.append(f"| {label} | {kind} (n={dialogs.get(kind, '?')}) | " +
                             " | ".join(fmt(_at(table.get(kind, {}), t)) for t in turns) + " |")
        words, found = [], []
        for kind in held:
            b, a = adherence.get("ppo", {}).get(kind, {}), adherence.get("gatt", {}).get(kind, {})
            words.append(f"{kind} adherence at turn {late[-1]} {change(_at(b, late[-1]), _at(a, late[-1]))} "
                         f"(n={dialogs.get(kind, '?')} dialogs)")
            if _finite(_at(b, late[-1])) and _finite(_at(a, late[-1])):
                found.append(_at(a, late[-1]) > _at(b, late[-1]))
        lines += ["", finding(
            "the GAtt model also keeps constraints that were never in its GAtt data, such as answering in haiku "
            "(Fig 28).", f"with GAtt, {'; '.join(words)}; {came_back(all(found) if found else None)}.")]
    return lines


def context_distillation_section(summary: dict[str, Any] | None, models: dict[str, Any], plots: Path) -> list[str]:
    """Fig 16b: the safety RM's score of each answer with the preprompt against without; kept or not."""
    if summary is None:
        return []
    with_pre, without, kept = summary["score_with"], summary["score_without"], summary["kept_mask"]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(4.6, 3.6))
    axis.scatter([w for w, k in zip(without, kept) if k], [w for w, k in zip(with_pre, kept) if k], s=10,
                 label="kept")
    axis.scatter([w for w, k in zip(without, kept) if not k], [w for w, k in zip(with_pre, kept) if not k],
                 s=10, label="rejected")
    axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    axis.set_xlabel("safety RM score without preprompt")
    axis.set_ylabel("with preprompt")
    axis.set_title("context distillation (Fig 16b)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(plots / "context_distillation.png", dpi=110)
    plt.close(figure)
    lines = ["", "## Safety context distillation (paper 4.2.4)", "",
             f"{summary['prompts']} adversarial prompts answered with and without a safety preprompt; the safety RM "
             f"preferred the distilled answer for **{summary['kept']}** of them (mean score gain "
             f"{fmt(summary['mean_gain_kept'])}); {summary['kept'] - summary.get('dropped_empty_answer', 0)} kept "
             f"for training ({summary.get('dropped_empty_answer', 0)} empty answers dropped).", "",
             "![context distillation](context_distillation.png)", ""]
    if without:
        median = sorted(without)[len(without) // 2]
        low = [k for w, k in zip(without, kept) if w < median]
        high = [k for w, k in zip(without, kept) if w >= median]
        share_low = sum(low) / len(low) if low else float("nan")
        share_high = sum(high) / len(high) if high else float("nan")
        found = share_low > share_high if low and high else None
        lines.append(finding(
            "the preprompt mostly helps answers that score low without it and can hurt high-scoring ones, hence a "
            "distilled answer is kept only where the safety RM scores it higher (Fig 16b).",
            f"the RM preferred the distilled answer for {fmt(share_low)} of the answers scoring below the median "
            f"({fmt(median)}) without the preprompt, against {fmt(share_high)} above it; {came_back(found)}."))
    if "gatt" in models and "context distillation" in models:
        g, c = models["gatt"], models["context distillation"]
        lines += ["", f"From the model before (gatt) to after context distillation: the violation rate on harmful "
                      f"prompts {change(g[SUITES[2]]['violation'], c[SUITES[2]]['violation'])}, on adversarial "
                      f"ones {change(adversarial_violation(g), adversarial_violation(c)) if 'violation_by_vector' in g and 'violation_by_vector' in c else 'was not measured'}"
                      f", and false refusals on borderline prompts "
                      f"{change(g[SUITES[3]]['refusal'], c[SUITES[3]]['refusal'], before_se=g[SUITES[3]].get('refusal_se'), after_se=c[SUITES[3]].get('refusal_se'))}."]
    return lines


# ------------------------------------------------------------------------------------- the report
def preconditions_section(table: Path) -> list[str]:
    """The world check of the SFT model (``llama2-lit world check``): what each later stage has
    to work with."""
    if not table.is_file():
        return []
    return ["", "## What the SFT model leaves the RLHF stages", "",
            "Each later stage needs room to show its finding: Ghost Attention a model that follows an "
            "instruction in the turn it is given and forgets it later (3.3), safety tuning violations to "
            "lower, most of them on attack-wrapped requests (4.2.1), rejection sampling a best of K above "
            "one sample (3.2.3). Measured on the SFT checkpoint by the oracle (`llama2-lit world check`):",
            "", "```", table.read_text().rstrip(), "```"]


def report_markdown(out: Path, size: str, results: dict[str, Any], plots: Path, unigram: float) -> str:
    """The report: what each stage achieved, in the layout of the paper's tables and figures."""
    from llama2_lit.runs import plot_runs

    stage_names = [p.parent.relative_to(out).as_posix() for p in sorted(out.glob(f"**/{DONE_FILE}"))]
    records = {name: json.loads((out / name / DONE_FILE).read_text()) for name in stage_names}
    order = [s.name for s in recipe(size, max((version_of(n) for n in records if n.startswith("v")), default=1))
             if s.name in records]
    lines = [f"# llama2_lit demo: the recipe on the toy world ({size})", "",
             "Every number below is measured on held-out prompts by the toy world's oracle "
             "(`llama2_lit.data.oracle`) or on held-out preference pairs; `llama2-lit evaluate` computes the "
             "same numbers for any checkpoints (`llama2_lit.evaluation`). Under each table or plot, **Paper:** says "
             "what the paper found there and **This run:** what these numbers show.", "",
             "| stage | seconds | resumed |", "|---|---|---|"]
    lines += [f"| {name} | {records[name]['seconds']:.1f} | {'yes' if records[name].get('resumed') else ''} |"
              for name in order]
    lines.append(f"| **total** | {sum(records[n]['seconds'] for n in order):.1f} | |")

    pretrain, sft = load_run(out / "pretrain"), load_run(out / "sft")
    plot_runs([pretrain], ["train/loss", "val/ppl"], plots / "curves_pretrain.png")
    plot_runs([sft], ["train/loss", "val/loss", "val/helpfulness"], plots / "curves_sft.png")
    ppl = pretrain.last("val/ppl")
    lines += ["", "## Pretraining (paper 2.2)", "",
              f"- validation perplexity **{fmt(ppl, 2)}**, against **{unigram:.1f}** for a unigram model fitted to "
              f"the training tokens" if ppl else "- no validation perplexity logged",
              f"- {pretrain.last('train/tokens') or 0:,.0f} training tokens at "
              f"{fmt(pretrain.last('perf/tokens_per_s'), 0)} tokens/s", "", "![pretraining](curves_pretrain.png)",
              "", "![SFT](curves_sft.png)"]

    models = results["models"]
    lines += preconditions_section(out / "check" / "check.txt")
    lines += stages_section(results, plots)
    lines += attack_vector_section(models)
    lines += reward_model_section(results.get("reward_model_versions", {}),
                                  {n: records[n]["summary"] for n in order if n.endswith("/annotate")})
    rs = {n: records[n]["summary"] for n in order if n.endswith("/rs")}
    lines += rejection_sampling_section(rs, models)
    lines += best_of_k_section({n: r.get("curves") or [] for n, r in rs.items()}, plots)
    if rs:
        lines += temperature_section({n: r.get("sweep") for n, r in rs.items()},
                                     {n: r["temperature"] for n, r in rs.items()}, plots)
    lines += ppo_section(load_run(out / "ppo") if (out / "ppo" / "metrics.csv").is_file() else None, plots)
    lines += safety_scores_section(results.get("reward_scores", {}), plots)
    lines += adherence_section(records["gatt/data"]["summary"] if "gatt/data" in records else None,
                               results.get("adherence_by_turn", {}), results.get("adherence_dialogs", {}))
    lines += context_distillation_section(records["cd/data"]["summary"] if "cd/data" in records else None,
                                          models, plots)

    lines += ["", "## Sample answers", ""]
    for suite in SUITES:
        lines.append(f"**{suite}**")
        lines += [f"- {name}: {results['samples'][name][suite][0]!r}" for name in models
                  if results["samples"][name][suite]]
        lines.append("")
    return "\n".join(lines) + "\n"


def report_stage(stage_dir: Path, *, size: str, results: str) -> dict[str, Any]:
    """The pipeline's ``report`` stage: ``OUT/report.md``, ``OUT/report.html`` and the plots, from the
    stages' records and the evaluation (also kept in the stage's own directory)."""
    out = stage_dir.parent
    unigram = pretraining_baseline(size)
    markdown = report_markdown(out, size, json.loads(Path(results).read_text()), stage_dir, unigram)
    (stage_dir / "report.md").write_text(markdown)
    (stage_dir / "report.html").write_text(markdown_to_html(markdown, title=f"llama2_lit demo ({size})"))
    for name in ("report.md", "report.html"):
        shutil.copy(stage_dir / name, out / name)
    for plot in stage_dir.glob("*.png"):
        shutil.copy(plot, out / plot.name)
    return {"report": str(out / "report.md"), "unigram_ppl": unigram,
            "val_ppl": load_run(out / "pretrain").last("val/ppl")}


def pretraining_baseline(size: str) -> float:
    """Validation perplexity of a unigram model fitted to the training tokens (the bar to clear)."""
    from llama2_lit.data.datamodules import PretrainDataModule
    from llama2_lit.stages.pretrain import dataset_targets, unigram_perplexity
    from llama2_lit.tokenizer import Tokenizer

    data_args = yaml.safe_load(Path(config_path(size, "pretrain")).read_text())["data"]["init_args"]
    data = PretrainDataModule(**data_args)
    data.prepare_data()
    data.setup("fit")
    vocab_size = Tokenizer(data_args["tokenizer_path"]).vocab_size
    return unigram_perplexity(dataset_targets(data.train_dataset), dataset_targets(data.val_dataset), vocab_size)


def markdown_to_html(markdown: str, *, title: str) -> str:
    """The report as one HTML page: the subset of markdown it uses (headings, paragraphs, lists,
    tables, fenced blocks, images, bold and code); the ``markdown`` package is not a dependency."""
    import html

    def inline(text: str) -> str:
        text = html.escape(text, quote=False)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
        text = re.sub(r"_([^_]+)_(?=\W|$)", r"<em>\1</em>", text)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)

    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):  # a fenced block: the text as it is
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            body.append("<pre>" + html.escape("\n".join(lines[i + 1:end]), quote=False) + "</pre>")
            i = end + 1
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
                i += 1
            header, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= {"-", ":"} for c in r)]
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in header) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rest) +
                        "</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
