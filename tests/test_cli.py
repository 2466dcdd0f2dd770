"""The Lightning CLI: every config validates; nano pretraining and SFT run from the command line,
resume into the same W&B run, refuse to clobber a run, stop cleanly on NaN; SFT raises the
oracle's helpfulness; ``llama2-lit runs`` tabulates and plots runs."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from llama2_lit.cli import main as cli_main
from llama2_lit.cli.runs import runs_main
from llama2_lit.runs import load_run
from llama2_lit.stages.callbacks import CheckpointSaveInterrupted
from llama2_lit.stages.cli import lightning_main
from llama2_lit.stages.toy_world import TOKENIZER_PATH, ensure_toy_assets

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def steps_of(path: Path, metric: str) -> list[int]:
    return [int(row["step"]) for row in rows(path) if row["metric"] == metric]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {int(row["step"]): float(row["value"]) for row in rows(run_dir / "metrics.csv") if row["metric"] == "train/loss"}


# ------------------------------------------------------------------------------------ configs
def test_there_are_configs_for_every_size_and_stage():
    names = {str(path.relative_to(REPO_ROOT / "configs")) for path in CONFIGS}
    stages = ("pretrain", "sft", "reward_helpfulness", "reward_safety", "ppo", "rejection_sampling", "gatt",
              "context_distillation")
    assert {f"{size}/{stage}.yaml" for size in ("nano", "micro", "llama2-7b") for stage in stages} <= names


def test_llama2_7b_stages_chain_through_each_others_run_folders():
    """A 7B stage that starts from an earlier stage's checkpoint names the folder that stage writes to
    (its ``run.dir``, or LightningCLI's default ``runs/<stage>-<preset>``)."""
    import importlib

    import yaml

    written, read = set(), []
    for path in sorted((REPO_ROOT / "configs" / "llama2-7b").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        model = config["model"]
        module, name = model["class_path"].rsplit(".", 1)
        stage = getattr(getattr(importlib.import_module(module), name), "stage", "stage")
        written.add((config.get("run") or {}).get("dir") or f"runs/{stage}-{model['init_args'].get('preset')}")
        read += [(path.name, key, value) for key, value in model["init_args"].items()
                 if key in ("init_from", "value_from", "reward_helpfulness", "reward_safety", "reference_from")
                 and isinstance(value, str) and value.startswith("runs/")]
    assert read, "no 7B stage reads another's checkpoint"
    for name, key, value in read:
        assert value.split("/checkpoints/")[0] in written, (name, key, value, sorted(written))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: str(path.relative_to(REPO_ROOT / "configs")))
def test_every_config_validates(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] in ("llama2_lit.stages.PretrainModule", "llama2_lit.stages.SFTModule",
                                              "llama2_lit.stages.RewardModule", "llama2_lit.stages.PPOModule")
    assert printed["data"]["class_path"].startswith("llama2_lit.data.datamodules.")
    assert printed["checkpoint"]["save_last"] is True


def test_a_misspelled_key_is_refused(tmp_path, capsys):
    text = (REPO_ROOT / "configs" / "nano" / "pretrain.yaml").read_text().replace("    lr: 3.0e-3", "    lrr: 3.0e-3")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(["fit", "--config", str(tmp_path / "bad.yaml"), "--print_config"])
    assert exit_info.value.code != 0
    assert "Option 'lrr' is not accepted" in capsys.readouterr().err


def test_llama2_7b_configs_carry_the_papers_hyperparameters():
    pretrain = yaml.safe_load((REPO_ROOT / "configs" / "llama2-7b" / "pretrain.yaml").read_text())
    model, data, trainer = pretrain["model"]["init_args"], pretrain["data"]["init_args"], pretrain["trainer"]
    assert (model["lr"], model["warmup_steps"], model["min_lr_ratio"]) == (3e-4, 2000, 0.1)  # 2.2, Table 1
    assert (tuple(model["betas"]), model["eps"], model["weight_decay"], model["grad_clip"]) == ((0.9, 0.95), 1e-5, 0.1, 1.0)
    tokens = data["seq_len"] * data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"]
    assert data["seq_len"] == 4096 and tokens == 4 * 2**20  # 4M-token batches (Table 1)
    assert trainer["strategy"]["init_args"]["param_dtype"] == "bfloat16" and trainer["devices"] == 8

    # RS fine-tuning is "similar to SFT" (3.2.3); GAtt and context distillation fine-tune "on an SFT
    # dataset" with no numbers of their own (3.3, 4.2.4): SFT's numbers for all of them.
    for stage in ("sft", "rejection_sampling", "gatt", "context_distillation"):
        sft = yaml.safe_load((REPO_ROOT / "configs" / "llama2-7b" / f"{stage}.yaml").read_text())
        model, data, trainer = sft["model"]["init_args"], sft["data"]["init_args"], sft["trainer"]
        assert (model["lr"], model["weight_decay"], trainer["max_epochs"], data["max_seq_len"]) == (2e-5, 0.1, 2, 4096)
        assert data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] == 64  # 3.1
        assert trainer["strategy"]["init_args"]["param_dtype"] == "bfloat16" and trainer["precision"] == "32-true"
        # GAtt: loss only on the last answer (3.3); the others train on every answer of the dialog.
        assert data.get("loss_on", "all_assistant") == ("last_assistant" if stage == "gatt" else "all_assistant")

    for kind in ("helpfulness", "safety"):  # reward models, 3.2.2
        reward = yaml.safe_load((REPO_ROOT / "configs" / "llama2-7b" / f"reward_{kind}.yaml").read_text())
        model, data, trainer = reward["model"]["init_args"], reward["data"]["init_args"], reward["trainer"]
        assert (model["lr"], model["min_lr_ratio"], model["warmup_fraction"], model["min_warmup_steps"]) == \
            (1e-5, 0.1, 0.03, 5)
        assert data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] == 512  # pairs
        assert trainer["max_epochs"] == 1 and trainer["strategy"]["init_args"]["param_dtype"] == "bfloat16"
        assert model["safety_aux_weight"] == (1.0 if kind == "safety" else 0.0)

    ppo = yaml.safe_load((REPO_ROOT / "configs" / "llama2-7b" / "ppo.yaml").read_text())  # 3.2.3
    model, data, trainer = ppo["model"]["init_args"], ppo["data"]["init_args"], ppo["trainer"]
    assert (model["lr"], model["min_lr_ratio"], model["warmup_steps"]) == (1e-6, 1.0, 0)  # constant 1e-6
    assert (tuple(model["betas"]), model["eps"], model["weight_decay"], model["grad_clip"]) == ((0.9, 0.95), 1e-5, 0.1, 1.0)
    assert (model["beta"], model["clip_eps"], model["ppo_epochs"]) == (0.01, 0.2, 1)  # β for 7B; one step per mini-batch
    assert data["batch_size"] * trainer["devices"] == 512 and model["mini_batch_size"] * trainer["devices"] == 64


def test_reward_model_configs_mix_the_data_as_the_paper():
    """Helpfulness RM: all helpfulness pairs + the safety pairs; safety RM: safety + 10% helpfulness (3.2.2)."""
    from llama2_lit.data.datamodules import mix_sources
    from llama2_lit.data.world import SIZES

    for size in ("nano", "micro"):
        helpful = yaml.safe_load((REPO_ROOT / "configs" / size / "reward_helpfulness.yaml").read_text())["data"]
        assert helpful["init_args"]["train_files"][0].endswith("preference_helpful_train.jsonl")
        assert helpful["init_args"]["train_weights"] == [1.0, 1.0]
        safety = yaml.safe_load((REPO_ROOT / "configs" / size / "reward_safety.yaml").read_text())["data"]
        files, weights = safety["init_args"]["train_files"], safety["init_args"]["train_weights"]
        assert files[0].endswith("preference_safety_train.jsonl") and files[1].endswith("preference_helpful_train.jsonl")
        world = SIZES["default"]  # the world the configs train on
        mixed = mix_sources([["s"] * world.preference_safety_train, ["h"] * world.preference_helpful_train],
                            weights, seed=0)
        assert mixed.count("h") / len(mixed) == pytest.approx(0.10, abs=0.001)


# ------------------------------------------------------------------------------------ nano runs
@pytest.fixture(scope="module")
def nano_pretrain(tmp_path_factory) -> Path:
    """Nano pretraining from the CLI: 20 of 30 steps, then ``--ckpt_path last`` for the rest."""
    run_dir = tmp_path_factory.mktemp("runs") / "pretrain-nano"
    args = ["fit", "--config", "configs/nano/pretrain.yaml", "--model.init_args.total_steps", "30",
            "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "4",
            "--checkpoint.every_n_train_steps", "10", "--run.dir", str(run_dir), *QUIET]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with contextlib.chdir(REPO_ROOT):
        ensure_toy_assets()
        assert lightning_main([*args, "--trainer.max_steps", "20"]) == 0
        assert lightning_main([*args, "--trainer.max_steps", "30", "--ckpt_path", "last"]) == 0
    torch.set_num_threads(before)
    return run_dir


def test_nano_pretraining_resumes_into_the_same_run(nano_pretrain):
    run_dir = nano_pretrain
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["stage"], info["size"], info["group"], info["job_type"]) == ("pretrain", "nano", "nano", "pretrain")
    assert info["name"].startswith("pretrain-nano-")
    # Both invocations logged to the one W&B run (offline: one folder per process, same id).
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(path.name.endswith("-" + info["wandb_id"]) for path in wandb_runs)
    # metrics.csv: each step once, in order, across the two processes.
    metrics = run_dir / "metrics.csv"
    assert steps_of(metrics, "train/loss") == [9, 19, 29]
    assert steps_of(metrics, "val/ppl") == [9, 19, 29]
    assert {row["metric"] for row in rows(metrics)} >= {"train/lr", "train/grad_norm", "perf/tokens_per_s",
                                                       "perf/mfu", "train/tokens", "val/loss"}
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 30
    assert checkpoint["model_config"]["name"] == "nano"
    assert checkpoint["tokenizer_path"] == str((REPO_ROOT / TOKENIZER_PATH).resolve())
    assert checkpoint["tokens_seen"] == 30 * 16 * 128
    assert len(checkpoint["rng_states"]) == 1
    assert (run_dir / "config.yaml").is_file()


def test_validate_a_checkpoint_from_the_cli(nano_pretrain, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert lightning_main(["validate", "--config", "configs/nano/pretrain.yaml", "--ckpt_path", "last",
                           "--trainer.limit_val_batches", "4", "--run.dir", str(nano_pretrain),
                           "--run.wandb", "false", *QUIET]) == 0
    validated = {row["metric"]: float(row["value"]) for row in rows(nano_pretrain / "validate-metrics.csv")}
    trained = {row["metric"]: float(row["value"]) for row in rows(nano_pretrain / "metrics.csv") if row["step"] == "29"}
    assert validated["val/ppl"] == pytest.approx(trained["val/ppl"], rel=1e-5)  # same weights, same batches


def test_a_fresh_fit_does_not_clobber_a_run(nano_pretrain, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    assert lightning_main(["fit", "--config", "configs/nano/pretrain.yaml", "--run.dir", str(nano_pretrain),
                           "--run.wandb", "false", *QUIET]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert torch.load(nano_pretrain / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30


def test_a_nan_stops_the_cli_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    ensure_toy_assets()
    status = lightning_main(["fit", "--config", "configs/nano/pretrain.yaml", "--trainer.max_steps", "8",
                             "--model.init_args.warmup_steps", "2", "--trainer.limit_val_batches", "0",
                             "--checkpoint.every_n_train_steps", "3", "--run.dir", str(tmp_path), "--run.wandb", "false",
                             "--trainer.callbacks+=llama2_lit.stages.callbacks.InjectNonFinite",
                             "--trainer.callbacks.at_step", "4", "--trainer.callbacks.target", "weights", *QUIET])
    assert status == 1
    error = capsys.readouterr().err
    assert "non-finite training loss (nan) at step 4" in error and "last.ckpt" in error
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_save_interrupted_midway_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    """The save of step 4 dies half-written: ``last`` still names step 2, and resuming from it
    reproduces the uninterrupted run's losses."""
    monkeypatch.chdir(REPO_ROOT)
    ensure_toy_assets()
    args = ["fit", "--config", "configs/nano/pretrain.yaml", "--trainer.max_steps", "6",
            "--model.init_args.total_steps", "6", "--model.init_args.warmup_steps", "2",
            "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
            "--checkpoint.every_n_train_steps", "2", "--run.wandb", "false", *QUIET]
    straight, run = tmp_path / "straight", tmp_path / "interrupted"
    checkpoints = run / "checkpoints"
    assert lightning_main([*args, "--run.dir", str(straight)]) == 0

    with pytest.raises(CheckpointSaveInterrupted, match="step 4"):
        lightning_main([*args, "--run.dir", str(run),
                        "--trainer.callbacks+=llama2_lit.stages.callbacks.InterruptCheckpointSave",
                        "--trainer.callbacks.at_step", "4"])
    # Half of step 4's bytes reached the disk, under a name nobody reads; last still names step 2.
    partial = checkpoints / "step-4.ckpt.partial"
    with pytest.raises(RuntimeError):
        torch.load(partial, weights_only=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-2.ckpt", "step-4.ckpt.partial"]
    assert (checkpoints / "last.ckpt").readlink() == Path("step-2.ckpt")
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2

    assert lightning_main([*args, "--run.dir", str(run), "--ckpt_path", "last"]) == 0
    losses, expected = train_losses(run), train_losses(straight)
    assert sorted(losses) == sorted(expected) == list(range(6))
    for step in range(6):  # steps 2-5 come from the resumed process
        assert losses[step] == pytest.approx(expected[step], rel=1e-6), f"step {step}"
    # The leftover is gone, the old checkpoints were removed after last moved (save_top_k: 1).
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-6.ckpt"]
    assert (checkpoints / "last.ckpt").readlink() == Path("step-6.ckpt")
    final = torch.load(checkpoints / "last.ckpt", weights_only=True)
    for name, tensor in torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_nano_sft_raises_the_oracles_helpfulness(nano_pretrain, tmp_path, monkeypatch):
    from llama2_lit.checkpoints import load_model
    from llama2_lit.data.records import load_records
    from llama2_lit.evaluation import helpfulness_summary, oracle_answers
    from llama2_lit.tokenizer import Tokenizer

    monkeypatch.chdir(REPO_ROOT)
    pretrained = nano_pretrain / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "sft-nano"
    assert lightning_main(["fit", "--config", "configs/nano/sft.yaml", "--model.init_args.init_from", str(pretrained),
                           "--trainer.max_steps", "200", "--trainer.val_check_interval", "200",
                           "--checkpoint.every_n_train_steps", "200", "--run.dir", str(run_dir),
                           "--run.wandb", "false", *QUIET]) == 0
    after = {row["metric"]: float(row["value"]) for row in rows(run_dir / "metrics.csv") if row["step"] == "199"}

    # The same 32 held-out prompts (the config's callback), answered by the pretrained model.
    callback = yaml.safe_load((REPO_ROOT / "configs" / "nano" / "sft.yaml").read_text())["trainer"]["callbacks"][0]
    prompts = load_records(callback["init_args"]["prompts_file"], "prompts")[: callback["init_args"]["num_prompts"]]
    answers = oracle_answers(load_model(pretrained), Tokenizer(REPO_ROOT / TOKENIZER_PATH), prompts,
                             max_new_tokens=callback["init_args"]["max_new_tokens"])
    before = helpfulness_summary(answers)
    assert after["val/helpfulness"] >= before["helpfulness"] + 0.05, (before, after)
    assert after["val/helpfulness_harmful"] > before["helpfulness_harmful"]  # it learned to refuse helpfully
    assert load_run(run_dir).info["stage"] == "sft"


# ------------------------------------------------------------------------------------ runs
def test_runs_command_tables_and_plots(tmp_path, capsys):
    for name, scale in (("pretrain-micro", 1.0), ("pretrain-nano", 2.0)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "run.json").write_text(json.dumps({"name": name, "stage": "pretrain", "size": name[9:]}))
        lines = ["step,metric,value,time"]
        for step in (9, 19, 29):
            lines += [f"{step},train/loss,{scale * 30 / (step + 1)},{1000 + step}", f"{step},val/ppl,{scale * 100 / (step + 1)},{1000 + step}"]
        lines.append(f"19,train/loss,{scale * 0.5},1100")  # logged again after a resume: the later row wins
        (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert runs_main([str(tmp_path / "pretrain-micro"), str(tmp_path / "pretrain-nano"), "--plot",
                      str(tmp_path / "plot.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "stage", "size", "steps", "wall", "train/loss", "val/ppl"]
    assert table[2].split() == ["pretrain-micro", "pretrain", "micro", "29", "1.5m", "1.0000", "3.3333"]
    assert table[3].split() == ["pretrain-nano", "pretrain", "nano", "29", "1.5m", "2.0000", "6.6667"]
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert load_run(tmp_path / "pretrain-nano").series["train/loss"] == [(9, 6.0), (19, 1.0), (29, 2.0)]
    with pytest.raises(SystemExit) as exit_:
        cli_main(["runs", str(tmp_path / "missing")])
    assert exit_.value.code == 2 and "missing" in capsys.readouterr().err
