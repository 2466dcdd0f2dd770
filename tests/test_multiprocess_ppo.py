"""PPO on two CPU processes under FSDP2 computes what one process computes (paper section 3.2.3).

Two launches of nano PPO with the same seed and the same global batch of 8 prompts:

1. one process, mini-batches of 4;
2. two processes (torchrun, ``--trainer.strategy fsdp2``), 4 prompts and mini-batches of 2 per
   rank, generating through the consolidated copy of the sharded policy (``llama2_lit.rollout``).

The rollout seeds depend on a prompt's place in the global batch, the score and the advantages are
whitened over every rank's rows, and each loss is normalised by the tokens of all ranks, so the two
runs' per-iteration numbers agree up to float summation order. The sharded checkpoint then resumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_ppo import metrics, models, ppo_args  # noqa: F401 (models is a fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def launch(command: list[str], args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(command + args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_ppo_under_fsdp2_on_two_processes_matches_one_process_and_resumes(models, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "llama2_lit"]
    one, two = tmp_path / "one", tmp_path / "two"
    fp32 = ["--trainer.precision", "32-true"]  # exact agreement needs one precision on both sides
    launch([sys.executable, "-m", "llama2_lit"], ppo_args(models, one, "--trainer.max_steps", "4", *fp32))
    sharded = ["--trainer.devices", "2", "--trainer.strategy", "fsdp2", "--data.init_args.batch_size", "4",
               "--model.init_args.mini_batch_size", "2", *fp32]
    launch(torchrun, ppo_args(models, two, "--trainer.max_steps", "2", *sharded))
    launch(torchrun, ppo_args(models, two, "--trainer.max_steps", "4", "--ckpt_path", "last", *sharded))

    single, double = metrics(one), metrics(two)
    assert sorted(double["ppo/kl"]) == sorted(single["ppo/kl"]) == [0, 1]  # iteration 1 is after the resume
    for name in ("ppo/reward_rc", "ppo/kl", "ppo/response_length", "ppo/policy_loss", "ppo/value_loss",
                 "train/loss"):
        for step, value in single[name].items():
            assert double[name][step] == pytest.approx(value, abs=1e-4), (name, step)
