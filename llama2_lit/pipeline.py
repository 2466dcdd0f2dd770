"""The recipe end to end on the toy world: ``make demo`` (``llama2-lit demo``).

Stages run in order, each from the YAML config a practitioner would use
(``configs/<size>/<stage>.yaml``) through the same ``llama2-lit fit`` command, and each writes its
run directory under ``--out``:

    world      the toy world's files and its 4096-piece tokenizer (data/world, data/tokenizer)
    pretrain   next-token pretraining (paper 2.2)            -> OUT/pretrain/
    sft        supervised fine-tuning on chat dialogs (3.1)  -> OUT/sft/  (init_from the pretraining)
    evaluate   the oracle judges greedy answers of both models on held-out suites
    report     OUT/report.md (+ OUT/curves.png): what each stage achieved, in numbers

Stages are cached: a finished stage leaves ``OUT/<stage>/DONE.json`` and is skipped next time; an
interrupted one resumes from its ``last.ckpt`` (optimizer, schedule, data position and RNG
restored). ``--fresh`` starts over. Later stages of the recipe (reward models, rejection sampling,
PPO, Ghost Attention, safety) join this list as they are built.

The evaluation suites (``evaluate``):

* ``tasks (held-out)`` — ``sft_eval``: questions about people known only from prose, arithmetic on
  operand pairs that appear nowhere in training, unseen words to transform (generalisation);
* ``tasks (seen)`` — task prompts from ``sft_train`` (what SFT was taught directly);
* ``harmful (held-out)`` — ``safety_eval``: a safe answer (refusal with help) is what scores;
* ``borderline (held-out)`` — ``borderline_eval``: benign prompts that look risky; refusing them
  is a false refusal (paper Fig 33).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

STAGES = ("pretrain", "sft")
DONE_FILE = "DONE.json"


# ------------------------------------------------------------------------------------- stages
def run_stage(stage: str, size: str, out: Path, extra_args: list[str]) -> tuple[Path, float]:
    """Train one stage with ``llama2-lit fit`` (a subprocess: a clean process per stage, as a user
    would run it); returns its final checkpoint and training seconds. Cached by ``DONE.json``;
    resumes if interrupted."""
    run_dir = out / stage
    done = run_dir / DONE_FILE
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if done.is_file():
        print(f"[{stage}] cached: {run_dir} (delete {done} or pass --fresh to retrain)")
        return checkpoint, json.loads(done.read_text())["seconds"]
    command = [sys.executable, "-m", "llama2_lit", "fit", "--config", str(config_path(size, stage)),
               "--run.dir", str(run_dir), "--trainer.enable_progress_bar", "false"]
    if stage == "sft":
        command += ["--model.init_args.init_from", str(out / "pretrain" / "checkpoints" / "last.ckpt")]
    if checkpoint.exists():
        print(f"[{stage}] resuming the interrupted run in {run_dir}")
        command += ["--ckpt_path", "last"]
    else:
        command += ["--run.overwrite", "true"]
    command += extra_args
    print(f"[{stage}] {' '.join(command[1:])}", flush=True)
    start = time.time()
    subprocess.run(command, check=True)
    if not checkpoint.exists():
        raise RuntimeError(f"[{stage}] finished without writing {checkpoint}")
    seconds = time.time() - start
    done.write_text(json.dumps({"checkpoint": str(checkpoint), "seconds": seconds, "command": command[1:]},
                               indent=2) + "\n")
    return checkpoint, seconds


def config_path(size: str, stage: str) -> Path:
    path = Path("configs") / size / f"{stage}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config for stage {stage!r} at size {size!r}: {path}")
    return path


# ------------------------------------------------------------------------------------- evaluation
def evaluation_suites(world: Path, n: int, seed: int = 0) -> dict[str, list[dict]]:
    """The held-out (and one seen) prompt sets the report scores; ``n`` prompts each, fixed by ``seed``."""
    from llama2_lit.data.records import load_records

    rng = random.Random(seed)

    def sample(records: list[dict]) -> list[dict]:
        return rng.sample(records, min(n, len(records)))

    def tasks(records: list[dict]) -> list[dict]:
        return [r for r in records if r.get("meta", {}).get("category") == "task"]

    return {
        "tasks (held-out)": sample(tasks(load_records(world / "sft_eval.jsonl", "chat"))),
        "tasks (seen)": sample(tasks(load_records(world / "sft_train.jsonl", "chat"))),
        "harmful (held-out)": sample(load_records(world / "safety_eval.jsonl", "prompts")),
        "borderline (held-out)": sample(load_records(world / "borderline_eval.jsonl", "prompts")),
    }


def evaluate_models(checkpoints: dict[str, Path], suites: dict[str, list[dict]], tokenizer_path: Path,
                    max_new_tokens: int) -> dict[str, Any]:
    """``{model: {suite: summary}}`` and a few answers per suite for the report."""
    from llama2_lit.checkpoints import load_model
    from llama2_lit.evaluation import oracle_answers, suite_summary
    from llama2_lit.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, list[str]]] = {}
    for name, checkpoint in checkpoints.items():
        model = load_model(checkpoint).eval()
        scores[name], samples[name] = {}, {}
        for suite, records in suites.items():
            results = oracle_answers(model, tokenizer, records, max_new_tokens=max_new_tokens)  # inference mode inside
            scores[name][suite] = suite_summary(results)
            samples[name][suite] = [r["response"] for r in results[:3]]
            print(f"[evaluate] {name:<10} {suite:<22} " + "  ".join(
                f"{k} {v:.3f}" for k, v in scores[name][suite].items() if k != "n"), flush=True)
    return {"scores": scores, "samples": samples}


def pretraining_baseline(size: str) -> float:
    """Validation perplexity of a unigram model fitted to the training tokens (the bar to clear)."""
    from llama2_lit.data.datamodules import PretrainDataModule
    from llama2_lit.stages.pretrain import dataset_targets, unigram_perplexity
    from llama2_lit.tokenizer import Tokenizer

    data_args = yaml.safe_load(config_path(size, "pretrain").read_text())["data"]["init_args"]
    data = PretrainDataModule(**data_args)
    data.prepare_data()
    data.setup("fit")
    vocab_size = Tokenizer(data_args["tokenizer_path"]).vocab_size
    return unigram_perplexity(dataset_targets(data.train_dataset), dataset_targets(data.val_dataset), vocab_size)


# ------------------------------------------------------------------------------------- report
def write_report(out: Path, size: str, evaluation: dict[str, Any], unigram: float, suites: dict[str, list[dict]],
                 seconds: dict[str, float]) -> Path:
    from llama2_lit.runs import load_run, plot_runs

    pretrain, sft = load_run(out / "pretrain"), load_run(out / "sft")
    plot_runs([pretrain], ["train/loss", "val/ppl"], out / "curves_pretrain.png")
    plot_runs([sft], ["train/loss", "val/loss", "val/helpfulness"], out / "curves_sft.png")

    def fmt(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"# llama2_lit demo: the recipe on the toy world ({size})", ""]
    lines += ["| stage | wall time |", "|---|---|"]
    lines += [f"| {stage} | {seconds[stage] / 60:.1f} min |" for stage in seconds]
    ppl = pretrain.last("val/ppl")
    lines += ["", "## Pretraining (paper 2.2)", "",
              f"- validation perplexity **{fmt(ppl, 2)}**, against **{unigram:.1f}** for a unigram model fitted "
              f"to the training tokens ({unigram / ppl:.0f}x lower)" if ppl else "- no validation perplexity logged",
              f"- {pretrain.last('train/tokens') or 0:,.0f} training tokens; throughput "
              f"{fmt(pretrain.last('perf/tokens_per_s'), 0)} tokens/s, MFU {100 * (pretrain.last('perf/mfu') or 0):.0f}% "
              "(against a matmul peak measured on this machine)",
              "", "![pretraining curves](curves_pretrain.png)", ""]
    lines += ["## Supervised fine-tuning (paper 3.1)", "",
              "Greedy answers judged by the toy world's oracle (`llama2_lit.data.oracle`). Helpfulness is in "
              "[0, 1]; accuracy is the share of exactly correct task answers; violation is the share of unsafe "
              "answers; refusal on borderline prompts is a false refusal.", ""]
    header = "| suite | n | model | helpfulness | accuracy | violation | refusal |"
    lines += [header, "|---|---|---|---|---|---|---|"]
    scores = evaluation["scores"]
    for suite in suites:
        for model in scores:
            s = scores[model][suite]
            lines.append(f"| {suite} | {int(s['n'])} | {model} | {fmt(s['helpfulness'])} | "
                         f"{fmt(s.get('accuracy'))} | {fmt(s['violation'])} | {fmt(s['refusal'])} |")
    lines += ["", "![SFT curves](curves_sft.png)", "", "## Sample answers", ""]
    for suite, records in suites.items():
        for index, record in enumerate(records[:2]):
            question = next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")
            lines.append(f"**{suite}** — _{question}_")
            lines += [f"- {model}: {evaluation['samples'][model][suite][index]!r}" for model in scores]
            lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "scores.json").write_text(json.dumps({"unigram_ppl": unigram, "val_ppl": ppl, "seconds": seconds,
                                                  "scores": scores}, indent=2) + "\n")
    return report


# ------------------------------------------------------------------------------------- all stages
def run_pipeline(size: str = "micro", out: str | Path = "runs/demo", *, fresh: bool = False, eval_prompts: int = 100,
                 max_new_tokens: int = 64, stage_args: dict[str, list[str]] | None = None) -> Path:
    """Every stage in order, then the evaluation and the report (``OUT/report.md``, returned).

    ``stage_args`` adds ``llama2-lit fit`` arguments per stage (``{"pretrain": ["--trainer.max_steps", "50"]}``);
    ``fresh`` deletes ``out`` first and trains everything again.
    """
    stage_args = stage_args or {}
    if unknown := sorted(set(stage_args) - set(STAGES)):
        raise ValueError(f"stage_args for unknown stages {unknown}; the stages are {list(STAGES)}")
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    start = time.time()
    from llama2_lit.stages.toy_world import ensure_toy_assets

    world, tokenizer_path = ensure_toy_assets()
    seconds["world"] = time.time() - start
    checkpoints = {}
    for stage in STAGES:
        checkpoints[stage], seconds[stage] = run_stage(stage, size, out, stage_args.get(stage, []))

    start = time.time()
    unigram = pretraining_baseline(size)
    suites = evaluation_suites(world, eval_prompts)
    evaluation = evaluate_models({"pretrained": checkpoints["pretrain"], "sft": checkpoints["sft"]}, suites,
                                 tokenizer_path, max_new_tokens)
    seconds["evaluate"] = time.time() - start
    return write_report(out, size, evaluation, unigram, suites, seconds)


if __name__ == "__main__":  # ``python -m llama2_lit.pipeline ...`` = ``llama2-lit demo ...``
    from llama2_lit.cli import main

    main(["demo", *sys.argv[1:]])
