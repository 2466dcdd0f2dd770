"""``llama2-lit fit|validate|test --config configs/<size>/<stage>.yaml``: the Lightning CLI.

The YAML picks the stage (``model.class_path``) and the data (``data.class_path``), sets their
arguments, the Trainer's, the checkpointing (``checkpoint:``) and the run (``run:``); any value can
be overridden on the command line (``--trainer.max_steps 100``); ``--print_config`` shows the
complete, validated configuration without running anything.

Every run gets a stable directory, ``runs/<stage>-<size>/`` unless ``run.dir`` says otherwise:

    runs/pretrain-micro/
      run.json          name, stage, size, W&B run id (read back on resume)
      config.yaml       the full configuration of the last invocation
      metrics.csv       step,metric,value,time (``llama2-lit runs`` reads it)
      checkpoints/      step-N.ckpt (directories when sharded); last.ckpt, a link to the newest
                        complete one (a save is renamed into place and linked only once whole)
      wandb/            the W&B run (offline unless WANDB_MODE says otherwise)

W&B runs are named ``<stage>-<size>-<timestamp>``, grouped by size (or ``--run.group``: the demo
groups the runs of one pipeline) and typed by stage (job_type), so the stages of one size sit
together and the same stage compares across sizes.

Resuming: ``llama2-lit fit --config ... --ckpt_path last`` restores the model, optimizer,
scheduler, loops, data-loader position and RNG states from ``checkpoints/last.ckpt``, logs to the
*same* W&B run (its id is in ``run.json``; Lightning's W&B logger plots against
``trainer/global_step`` while W&B's own step keeps counting up, so W&B never sees a step go
backwards), and cuts ``metrics.csv`` back to the checkpoint's step before appending. A fresh ``fit``
refuses to reuse a directory that holds a run unless ``--run.overwrite true``.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from llama2_lit.config import ModelConfig
from llama2_lit.runs import METRICS_FILE, RUN_INFO_FILE
from llama2_lit.stages.base import NonFiniteLossError, StageModule
from llama2_lit.stages.callbacks import StageCheckpoint
from llama2_lit.stages.loggers import RunCSVLogger
from llama2_lit.stages.precision import resolve_precision
from llama2_lit.stages.toy_world import ensure_toy_assets, missing_toy_paths


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked (holds another run, or lacks the one to resume)."""


@dataclass
class RunOptions:
    """Where a run writes and how it is named."""

    dir: str | None = None
    """Run directory (default: runs/<stage>-<size>)."""
    name: str | None = None
    """Run name (default: <stage>-<size>-<YYYYmmdd-HHMMSS>)."""
    project: str = "llama2_lit"
    """W&B project."""
    group: str | None = None
    """W&B group (default: the size); ``llama2-lit demo`` puts every run of one pipeline in one group."""
    wandb: bool = True
    """Also log to W&B (offline unless the environment sets WANDB_MODE)."""
    overwrite: bool = False
    """Let a fresh fit replace the run already in the directory (its checkpoints and logs)."""


@dataclass
class _RunPlan:
    """What ``before_instantiate_classes`` decided for this invocation."""

    verb: str
    stage: str
    size: str
    run_dir: Path
    name: str
    run_id: str
    options: RunOptions
    ckpt_path: str | None
    resume_step: int | None
    checkpoint_config: ModelConfig | None
    checkpoint_model_configs: dict[str, dict[str, Any]] | None = None


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """Everything but the tensors of a stage checkpoint (file or sharded directory), cheaply."""
    path = Path(path)
    if path.is_dir():
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer_states")}


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class LoggedConfigCallback(SaveConfigCallback):
    """Writes the config into the run directory and logs it to the loggers (W&B's run config)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


class StageCLI(LightningCLI):
    """LightningCLI over every ``StageModule`` and ``LightningDataModule``, with run directories."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.plan: _RunPlan | None = None
        self._run_info: tuple[Path, dict[str, Any]] | None = None  # run.json to write once everything is built
        super().__init__(
            model_class=StageModule, subclass_mode_model=True,
            datamodule_class=L.LightningDataModule, subclass_mode_data=True,
            save_config_callback=LoggedConfigCallback, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the stage's own AdamW + schedule (paper 2.2)
            args=args, run=run,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_class_arguments(RunOptions, "run")
        parser.add_lightning_class_args(StageCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.filename": "step-{step}",
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.save_last": True,
        })

    def _parse_ckpt_path(self) -> None:
        """Keep the configuration as given (LightningCLI would overwrite the model's arguments with
        the hyper-parameters saved in a ``--ckpt_path`` file, but not with ``--ckpt_path last``).

        The config defines the run; the checkpoint supplies the weights, the optimizer, scheduler,
        loop and data-loader state, and the model's shape (``restore_weights_from_checkpoint``).
        """

    # ------------------------------------------------------------------------------ run plan
    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        verb = self.subcommand
        config = self.config[verb]
        stage = getattr(_import(config.model.class_path), "stage", "stage")
        init_args = config.model.init_args
        size = init_args.get("preset") or "custom"
        options = RunOptions(**vars(config.run))
        run_dir = Path(options.dir or f"runs/{stage}-{size}")
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir / "checkpoints")
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(run_dir)
        checkpoint_dir = Path(config.checkpoint.dirpath)
        is_zero = rank_zero_only.rank == 0
        # bf16-mixed on a CPU without bf16 units trains in fp32 instead (stages/precision.py).
        precision, note = resolve_precision(config.trainer.precision, config.trainer.accelerator)
        if note is not None:
            config.trainer.precision = precision
            if is_zero:
                print(note)
        if is_zero and missing_toy_paths([config.data.as_dict(), config.model.as_dict()]):
            ensure_toy_assets()  # the toy world and its tokenizer, on first use (toy_world.py)
        init_from = init_args.get("init_from")
        if init_from and not Path(init_from).exists() and config.get("ckpt_path") is None:
            raise RunDirectoryError(f"model.init_args.init_from: {init_from} does not exist (train the stage that "
                                    "writes it first, e.g. llama2-lit fit --config configs/<size>/pretrain.yaml)")

        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            last = checkpoint_dir / "last.ckpt"
            if last.is_symlink() and not last.exists():
                raise RunDirectoryError(f"--ckpt_path last: {last} links to {os.readlink(last)}, which is gone")
            if last.exists():
                ckpt_path = str(last)
            else:
                if verb != "fit":
                    raise RunDirectoryError(f"--ckpt_path last: there is no {last}")
                if is_zero:
                    print(f"llama2-lit fit: no {last} yet; starting a fresh run")
                ckpt_path = None
            config.ckpt_path = ckpt_path
        if ckpt_path and not Path(ckpt_path).exists():
            raise RunDirectoryError(f"--ckpt_path {ckpt_path} does not exist")
        metadata = read_checkpoint_metadata(ckpt_path) if ckpt_path else {}
        checkpoint_config = ModelConfig.from_dict(metadata["model_config"]) if "model_config" in metadata else None
        resume_step = int(metadata.get("global_step", 0)) if (verb == "fit" and ckpt_path) else None

        timestamp = time.strftime("%Y%m%d-%H%M%S")
        info_path = run_dir / RUN_INFO_FILE
        if verb == "fit" and resume_step is not None and info_path.is_file():
            info = json.loads(info_path.read_text())
            name, run_id = info["name"], info["wandb_id"]
        else:
            suffix = f"-{verb}" if verb != "fit" else ""
            name = options.name or f"{stage}-{size}{suffix}-{timestamp}"
            run_id = _new_run_id()
        if verb == "fit" and resume_step is None and is_zero:
            self._start_fresh(run_dir, checkpoint_dir, options)
        self._run_info = None
        if verb == "fit" and is_zero and not (resume_step is not None and info_path.is_file()):
            # Written once the model, data and trainer are built: a bad config value leaves no run behind.
            self._run_info = (info_path, {"name": name, "stage": stage, "size": size, "wandb_id": run_id,
                                          "project": options.project, "group": options.group or size, "job_type": stage,
                                          "created": timestamp})
        if verb != "fit":
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"{verb}-config.yaml"}
        self.plan = _RunPlan(verb, stage, size, run_dir, name, run_id, options, ckpt_path, resume_step,
                             checkpoint_config, metadata.get("model_configs"))

    @staticmethod
    def _start_fresh(run_dir: Path, checkpoint_dir: Path, options: RunOptions) -> None:
        """A fresh fit: the directory must not hold another run, unless overwriting was asked for."""
        old = [path for path in (checkpoint_dir, run_dir / METRICS_FILE, run_dir / RUN_INFO_FILE)
               if path.exists() and (not path.is_dir() or any(path.iterdir()))]
        if not old:
            return
        if not options.overwrite:
            raise RunDirectoryError(
                f"{run_dir} already holds a run ({', '.join(str(p) for p in old)}). Resume it with "
                "--ckpt_path last, start elsewhere with --run.dir DIR, or replace it with --run.overwrite true")
        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def after_instantiate_classes(self) -> None:
        if self._run_info is not None:
            info_path, info = self._run_info
            info_path.parent.mkdir(parents=True, exist_ok=True)
            partial = info_path.with_name(info_path.name + ".partial")
            partial.write_text(json.dumps(info, indent=2) + "\n")
            partial.replace(info_path)
        plan = self.plan
        if plan is not None and plan.ckpt_path and plan.checkpoint_config is not None:
            # The weights come from the checkpoint: build the model with its config, skip init_from.
            self.model.restore_weights_from_checkpoint(plan.checkpoint_config, plan.checkpoint_model_configs)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.plan is not None and trainer_config.get("logger") in (None, True):
            kwargs["logger"] = self._loggers(self.plan)
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _loggers(plan: _RunPlan) -> list[Any]:
        filename = METRICS_FILE if plan.verb == "fit" else f"{plan.verb}-{METRICS_FILE}"
        loggers: list[Any] = [RunCSVLogger(plan.run_dir, resume_step=plan.resume_step, filename=filename)]
        if plan.options.wandb:
            from lightning.pytorch.loggers import WandbLogger

            job_type = plan.stage if plan.verb == "fit" else f"{plan.stage}-{plan.verb}"
            loggers.append(WandbLogger(
                name=plan.name, project=plan.options.project, group=plan.options.group or plan.size, job_type=job_type,
                tags=[plan.stage, plan.size], id=plan.run_id, save_dir=str(plan.run_dir), resume="allow",
            ))
        return loggers


def lightning_main(argv: list[str] | None = None) -> int:
    """Entry point of ``llama2-lit fit|validate|test`` (argv includes the verb)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    argv = list(sys.argv[1:] if argv is None else argv)
    # LightningCLI reads sys.argv (and warns when it is given other args): called from Python (a
    # test, a notebook) with its own argv, it sees that command line for the call's duration.
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *argv]
    status = 1
    try:
        StageCLI()
        status = 0
    except (NonFiniteLossError, RunDirectoryError) as error:
        verb = argv[0] if argv else ""
        print(f"\nllama2-lit {verb}: error: {error}", file=sys.stderr)
    finally:
        sys.argv = saved_argv
        _finish_wandb(status)
    return status


def _finish_wandb(status: int) -> None:
    """Close the W&B run, so that a second run in the same process (a notebook) starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=status)
