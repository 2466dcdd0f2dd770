"""Two CPU processes (gloo, FSDP2 through ``ModelParallelStrategy``) train the nano reward model
through the CLI; its sharded checkpoint consolidates into one file that loads as a reward model.

``torchrun`` launches the ranks (a subprocess with a timeout: never a distributed launch inside
pytest). The RM starts from the nano preset (no SFT checkpoint needed); two validation files give
per-file metrics.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2_lit.cli import main as cli_main
from llama2_lit.parallelize import is_sharded_checkpoint
from llama2_lit.reward_metrics import evaluate_pairs, load_reward_model
from llama2_lit.stages.toy_world import TOKENIZER_PATH, ensure_toy_assets

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def test_fsdp2_trains_the_nano_reward_model_and_its_checkpoint_consolidates_and_loads(tmp_path):
    import contextlib

    from llama2_lit.data.records import load_records
    from llama2_lit.tokenizer import Tokenizer

    with contextlib.chdir(REPO_ROOT):
        ensure_toy_assets()  # before launching, so that no rank races to generate them
    run_dir = tmp_path / "rm"
    val_files = []
    for name in ("preference_helpful_eval", "preference_safety_eval"):  # 8 pairs each: both files on both ranks
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join((REPO_ROOT / "data" / "world" / f"{name}.jsonl").read_text().splitlines(True)[:8]))
        val_files.append(str(path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "llama2_lit", "fit", "--config", "configs/nano/reward_helpfulness.yaml",
               "--model.init_args.init_from", "null", "--trainer.devices", "2", "--trainer.strategy", "fsdp2",
               "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
               "--data.init_args.val_files", f"[{', '.join(val_files)}]",
               "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "6",
               "--data.init_args.batch_size", "8", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--run.dir", str(run_dir), "--run.wandb", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    last = run_dir / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(last) and sorted(p.name for p in last.glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    with (run_dir / "metrics.csv").open() as file:
        logged = {(row["step"], row["metric"]): float(row["value"]) for row in csv.DictReader(file)}
    losses = [value for (step, metric), value in logged.items() if metric == "train/loss"]
    assert len(losses) == 6 and all(0 < loss < 10 for loss in losses)
    for metric in ("val/accuracy", "val/preference_helpful_eval/accuracy", "val/preference_safety_eval/accuracy",
                   "val/accuracy_significantly_better", "val/unsafe_recall"):
        assert ("5", metric) in logged, metric

    merged = tmp_path / "merged.ckpt"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["consolidate", str(last), str(merged)])
    assert exit_.value.code == 0
    saved = torch.load(merged, weights_only=True)
    assert saved["global_step"] == 6 and saved["model_configs"]["model"]["name"] == "nano"
    assert "model.score.weight" in saved["state_dict"] and "model.output.weight" not in saved["state_dict"]
    rm = load_reward_model(merged)
    pairs = load_records(REPO_ROOT / "data/world/preference_helpful_eval.jsonl", "preference")[:16]
    metrics = evaluate_pairs(rm, Tokenizer(REPO_ROOT / TOKENIZER_PATH), pairs)
    assert metrics["pairs"] == 16 and 0.0 <= metrics["accuracy"] <= 1.0
