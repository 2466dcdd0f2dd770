"""Two CPU processes (gloo): FSDP2 and DDP train nano pretraining through the CLI, the same numbers.

One purposeful test, four launches:

1. FSDP2 (``--trainer.strategy fsdp2``, launched like a cluster job with torchrun) trains 2 steps
   and saves a sharded checkpoint (a DCP directory); rank 1 then dies in the middle of the save
   at step 4 (``InterruptCheckpointSave``), leaving its shard half-written;
2. the same command with ``--ckpt_path last`` resumes from the shards of step 2 (``last`` still
   names them) and trains steps 3-6, validating after each step with the oracle callback
   generating from a consolidated copy of the sharded weights (``llama2_lit.rollout``);
3. DDP (``--trainer.strategy ddp``, Lightning's own launcher) trains the 6 steps uninterrupted;
4. FSDP2 in mixed precision (``fsdp2_bf16``: bf16 ``param_dtype``, fp32 master weights, activation
   checkpointing) trains 4 steps under the config's own precision (``bf16-mixed`` where the CPU
   has bf16 units).

Launches 1-3 run in fp32 (``--trainer.precision 32-true``), so that they can agree exactly.

Both runs start from the same weights (under FSDP rank 0 builds them and they are broadcast
shard by shard), see the same data (each rank reads every other window), and average gradients
over the 2 ranks, so their per-step losses agree up to float summation order; that checks the
sharding, the sharded resume (weights, optimizer, schedule, data position) and DDP at once. The
sharded checkpoint is then consolidated into one file that ``llama2-lit convert`` reads, and its
weights equal DDP's final weights.

``strategy="ddp"`` never runs inside pytest (it would relaunch pytest): every launch is a
subprocess with a timeout.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2_lit.checkpoints import load_checkpoint
from llama2_lit.cli import main as cli_main
from llama2_lit.parallelize import is_sharded_checkpoint
from llama2_lit.stages.cli import read_checkpoint_metadata
from llama2_lit.stages.toy_world import ensure_toy_assets

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def train_losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as file:
        return {int(row["step"]): float(row["value"]) for row in csv.DictReader(file) if row["metric"] == "train/loss"}


def launch(command: list[str], run_dir: Path, *extra: str, succeeds: bool = True) -> None:
    args = ["fit", "--config", "configs/nano/pretrain.yaml", "--trainer.devices", "2",
            "--model.init_args.total_steps", "6", "--model.init_args.warmup_steps", "2",
            "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
            "--checkpoint.every_n_train_steps", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--run.dir", str(run_dir), "--run.wandb", "false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert (result.returncode == 0) == succeeds, \
        f"{' '.join(command + args)} exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_fsdp2_and_ddp_on_two_processes_train_resume_and_consolidate(tmp_path):
    with_cwd = Path.cwd()
    os.chdir(REPO_ROOT)
    try:
        ensure_toy_assets()  # before launching, so that no rank races to generate them
    finally:
        os.chdir(with_cwd)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "llama2_lit"]
    lightning = [sys.executable, "-m", "llama2_lit"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"

    fp32 = ["--trainer.precision", "32-true"]
    launch(torchrun, fsdp, "--trainer.strategy", "fsdp2", "--trainer.max_steps", "6",
           "--trainer.callbacks+=llama2_lit.stages.callbacks.InterruptCheckpointSave",
           "--trainer.callbacks.at_step", "4", "--trainer.callbacks.rank", "1", "--trainer.callbacks.how", "exit",
           *fp32, succeeds=False)
    checkpoints = fsdp / "checkpoints"
    last, partial = checkpoints / "last.ckpt", checkpoints / "step-4.ckpt.partial"
    # Step 4's directory was never renamed into place; last still names step 2's, which is whole.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-2.ckpt", "step-4.ckpt.partial"]
    assert last.readlink() == Path("step-2.ckpt") and read_checkpoint_metadata(last)["global_step"] == 2
    assert is_sharded_checkpoint(last) and sorted(p.name for p in last.glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    assert (partial / "__1_0.distcp").stat().st_size < (last / "__1_0.distcp").stat().st_size  # half of it
    # The resumed run also validates after each step, with the oracle callback decoding from a
    # consolidated copy of the shards before training goes on: generation must not break training.
    launch(torchrun, fsdp, "--trainer.strategy", "fsdp2", "--trainer.max_steps", "6", "--ckpt_path", "last", *fp32,
           "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "2",
           "--trainer.callbacks+=llama2_lit.stages.callbacks.OracleHelpfulness",
           "--trainer.callbacks.prompts_file", "data/world/rl_prompts_eval.jsonl",
           "--trainer.callbacks.num_prompts", "4", "--trainer.callbacks.max_new_tokens", "6")
    launch(lightning, ddp, "--trainer.strategy", "ddp", "--trainer.max_steps", "6", *fp32)
    bf16 = tmp_path / "fsdp_bf16"
    launch(torchrun, bf16, "--trainer.strategy", "fsdp2_bf16", "--trainer.max_steps", "4")

    fsdp_losses, ddp_losses = train_losses(fsdp), train_losses(ddp)
    assert sorted(fsdp_losses) == sorted(ddp_losses) == list(range(6))
    for step in range(6):  # steps 2-5 come from the resumed FSDP run
        assert fsdp_losses[step] == pytest.approx(ddp_losses[step], abs=1e-5), f"step {step}"
    assert fsdp_losses[5] < fsdp_losses[0] - 0.3  # and it learns
    # bf16 compute follows the fp32 run closely (the same weights, data and schedule).
    bf16_losses = train_losses(bf16)
    assert sorted(bf16_losses) == list(range(4))
    for step in range(4):
        assert bf16_losses[step] == pytest.approx(ddp_losses[step], abs=0.05), f"bf16 step {step}"
    with (fsdp / "metrics.csv").open() as file:
        validated = [(row["step"], row["metric"]) for row in csv.DictReader(file) if row["metric"].startswith("val/")]
    assert {("4", "val/ppl"), ("5", "val/ppl"), ("4", "val/helpfulness"), ("5", "val/helpfulness")} <= set(validated)
    # The leftover is gone; step 2's and 4's checkpoints were removed only after last moved on.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-6.ckpt"]
    assert last.readlink() == Path("step-6.ckpt") and is_sharded_checkpoint(last)

    # Consolidate the shards into one file; `llama2-lit convert` reads it; the weights are DDP's.
    merged = tmp_path / "merged.ckpt"
    for command in (["consolidate", str(last), str(merged)], ["convert", str(merged), str(tmp_path / "lit")]):
        with pytest.raises(SystemExit) as exit_:
            cli_main(command)
        assert exit_.value.code == 0, command
    converted, config = load_checkpoint(tmp_path / "lit")
    assert config.name == "nano" and config.n_layers == 2
    ddp_weights, _ = load_checkpoint(ddp / "checkpoints" / "last.ckpt")
    assert sorted(converted) == sorted(ddp_weights)
    for name, tensor in ddp_weights.items():
        torch.testing.assert_close(converted[name], tensor, atol=2e-5, rtol=0, msg=name)
    assert torch.load(merged, weights_only=True)["global_step"] == 6
