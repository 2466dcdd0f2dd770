"""The recipe end to end on the toy world, as a declared graph of stages: ``make demo`` (``llama2-lit demo``).

A stage is data (``Stage``): its name, the stages whose outputs it reads (``inputs``), what it
writes under ``OUT/<name>/`` (``outputs``), and how it runs — a ``llama2-lit fit`` of a YAML config
with command-line overrides (a subprocess: a clean process per stage, as a user would run it), or
a Python function (annotation, data synthesis, evaluation, the report). Overrides and parameters
name other stages' outputs as ``${stage}`` (the first output) or ``${stage.key}``; only declared
inputs may be named. ``recipe(size, versions)`` builds the paper's order at toy scale:

    world                 the toy world's files and its 4096-piece tokenizer (data/world, data/tokenizer)
    pretrain              next-token pretraining (paper 2.2)
    sft                   supervised fine-tuning on chat dialogs (3.1)
    check                 what the SFT model leaves the RLHF stages (``llama2_lit.world_check``)
    v<k>/annotate         fresh preference pairs on the latest policy's samples, annotated by the oracle (3.2.1)
    v<k>/rm_helpfulness   both reward models retrained from the SFT checkpoint on the static pairs and
    v<k>/rm_safety          every annotated batch so far (3.2.2)
    v<k>/rs, v<k>/rs_sft  best-of-K from the latest policy by these RMs, pooled with the earlier versions'
                          kept samples, then SFT on the pool's best: the next policy (3.2.3)
    ppo                   the last version: PPO from its rejection-sampling model with its reward models (3.2.3)
    gatt/data, gatt/sft   Ghost Attention data sampled from the PPO model, then SFT on it (3.3)
    cd/data, cd/sft       safety context distillation data, kept by the safety RM, then SFT (4.2.4)
    evaluate              the evaluation suite on every stage's model (llama2_lit.evaluation)
    report                OUT/report.md, its plots and OUT/report.html (``llama2_lit.report``)

Caching: a finished stage writes ``OUT/<name>/DONE.json`` with its *key* — a hash of its config
file, overrides, parameters and the identities of its inputs — and an *identity* (its key and
when it finished). A stage is skipped when its DONE key equals the key computed now, so editing a
config reruns that stage and, because its identity changes, everything downstream.
``--force STAGE`` (a name, or a tag such as ``rm``) reruns the matching stages and everything
downstream of them. An interrupted training stage resumes from its ``last.ckpt`` (``--ckpt_path
last``: optimizer, schedule, data position and RNG restored) when its key has not changed.
A function's code is not part of its key: after editing one, ``--force`` its stage.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DONE_FILE = "DONE.json"
STARTED_FILE = "STARTED.json"
CHECKPOINT = "checkpoints/last.ckpt"
PLACEHOLDER = re.compile(r"\$\{([^}.]+)(?:\.(\w+))?\}")


class PipelineError(ValueError):
    """A graph that cannot run as declared (unknown input, cycle, a placeholder naming an undeclared input)."""


# ------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Stage:
    """One node of the pipeline.

    Exactly one of ``config`` (a ``llama2-lit fit`` stage; ``overrides`` are its extra
    ``--key value`` arguments, a list value given as a JSON list) and ``function`` (called as
    ``function(stage_dir, **params)``, returning a JSON-able summary) is set. ``outputs`` maps a
    name to a path inside the stage's directory; the first is what ``${name}`` means.
    """

    name: str
    inputs: tuple[str, ...] = ()
    config: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    function: Callable[..., dict[str, Any]] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=lambda: {"checkpoint": CHECKPOINT})
    tags: tuple[str, ...] = ()
    about: str = ""

    @property
    def is_training(self) -> bool:
        return self.config is not None


def check_graph(stages: Sequence[Stage]) -> None:
    """Names unique, inputs declared before use (so the list is a topological order), exactly one way to
    run, and every ``${...}`` placeholder naming a declared input and one of its outputs."""
    seen: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in seen:
            raise PipelineError(f"stage {stage.name!r} is declared twice")
        for other in seen:
            if stage.name.startswith(f"{other}/") or other.startswith(f"{stage.name}/"):
                raise PipelineError(f"stages {other!r} and {stage.name!r}: one's directory would hold the other's")
        if (stage.config is None) == (stage.function is None):
            raise PipelineError(f"stage {stage.name!r}: give exactly one of config= and function=")
        for name in stage.inputs:
            if name not in seen:
                raise PipelineError(f"stage {stage.name!r}: input {name!r} is not a stage declared before it")
        for name, key in _placeholders([stage.overrides, dict(stage.params)]):
            if name not in stage.inputs:
                raise PipelineError(f"stage {stage.name!r}: ${{{name}}} names a stage that is not one of its inputs "
                                    f"{list(stage.inputs)}")
            if key is not None and key not in seen[name].outputs:
                raise PipelineError(f"stage {stage.name!r}: ${{{name}.{key}}}: {name!r} has no output {key!r} "
                                    f"(its outputs: {list(seen[name].outputs)})")
        seen[stage.name] = stage


def select(stages: Sequence[Stage], selectors: Iterable[str]) -> set[str]:
    """The stages a ``--force`` selector names: a stage's name, or one of its tags."""
    names = set()
    for selector in selectors:
        matched = {s.name for s in stages if s.name == selector or selector in s.tags}
        if not matched:
            known = sorted({s.name for s in stages} | {t for s in stages for t in s.tags})
            raise PipelineError(f"--force {selector}: no stage has this name or tag; choose from {known}")
        names |= matched
    return names


def downstream(stages: Sequence[Stage], names: Iterable[str]) -> set[str]:
    """``names`` and every stage that reads, directly or not, one of their outputs."""
    closure = set(names)
    for stage in stages:  # declaration order is a topological order (check_graph)
        if closure.intersection(stage.inputs):
            closure.add(stage.name)
    return closure


def output_path(out: Path, stage: Stage, key: str | None = None) -> Path:
    """Where ``${stage}`` / ``${stage.key}`` points."""
    if not stage.outputs:
        raise PipelineError(f"stage {stage.name!r} declares no outputs to point at")
    return out / stage.name / stage.outputs[key or next(iter(stage.outputs))]


def resolve(value: Any, out: Path, by_name: Mapping[str, Stage]) -> Any:
    """``value`` with every ``${stage}`` / ``${stage.key}`` replaced by the output's path (strings, nested
    lists, tuples and dicts)."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: str(output_path(out, by_name[m.group(1)], m.group(2))), value)
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v, out, by_name) for v in value)
    if isinstance(value, Mapping):
        return {k: resolve(v, out, by_name) for k, v in value.items()}
    return value


def _placeholders(value: Any) -> list[tuple[str, str | None]]:
    if isinstance(value, str):
        return [(m.group(1), m.group(2)) for m in PLACEHOLDER.finditer(value)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _placeholders(v)]
    if isinstance(value, Mapping):
        return [p for v in value.values() for p in _placeholders(v)]
    return []


# ------------------------------------------------------------------------------------- caching
def stage_key(stage: Stage, input_identities: Mapping[str, str], root: Path = Path(".")) -> str:
    """What a stage's result depends on: its config file's text, overrides, function and parameters,
    and the identities of its inputs' results."""
    spec = {
        "config": stage.config, "overrides": [list(o) for o in stage.overrides],
        "config_text": (root / stage.config).read_text() if stage.config else None,
        "function": f"{stage.function.__module__}.{stage.function.__qualname__}" if stage.function else None,
        "params": stage.params, "outputs": dict(stage.outputs),
        "inputs": {name: input_identities[name] for name in stage.inputs},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(out: Path, stage: Stage, marker: str = DONE_FILE) -> dict[str, Any] | None:
    path = out / stage.name / marker
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None  # a marker cut short by a crash: the stage did not finish


def plan(stages: Sequence[Stage], out: Path, force: Iterable[str] = (), root: Path = Path(".")) -> dict[str, str]:
    """What each stage will do: ``cached`` (finished with the same key), ``resume`` (an interrupted
    training run with the same key and a checkpoint), or ``run``. A stage downstream of one that
    runs runs too (its inputs' identities will change)."""
    forced = downstream(stages, select(stages, force))
    status: dict[str, str] = {}
    identities: dict[str, str] = {}
    for stage in stages:
        if stage.name in forced or any(status[name] != "cached" for name in stage.inputs):
            status[stage.name] = "run"
            continue
        key = stage_key(stage, identities, root)
        done = read_marker(out, stage)
        if done is not None and done.get("key") == key:
            status[stage.name] = "cached"
            identities[stage.name] = done["identity"]
        else:
            started = read_marker(out, stage, STARTED_FILE)
            resumable = (stage.is_training and started is not None and started.get("key") == key
                         and (out / stage.name / CHECKPOINT).exists())
            status[stage.name] = "resume" if resumable else "run"
    return status


# ------------------------------------------------------------------------------------- running
def fit_command(stage: Stage, out: Path, by_name: Mapping[str, Stage], *, group: str, resume: bool,
                progress_bar: bool = True) -> list[str]:
    """The ``llama2-lit fit`` command line of a training stage; Lightning's progress bar, or with
    ``progress_bar=False`` one line every few steps."""
    command = [sys.executable, "-m", "llama2_lit", "fit", "--config", stage.config, "--run.dir", str(out / stage.name),
               "--run.group", group]
    for option, value in stage.overrides:
        value = resolve(value, out, by_name)
        command += [option, json.dumps(value) if isinstance(value, (list, tuple)) else str(value)]
    if not progress_bar:
        # Not a terminal: a line every few steps instead of a redrawn bar (stages.callbacks.ProgressLine).
        command += ["--trainer.enable_progress_bar", "false",
                    "--trainer.callbacks+=llama2_lit.stages.callbacks.ProgressLine",
                    "--trainer.callbacks.prefix", stage.name]
    command += ["--ckpt_path", "last"] if resume else ["--run.overwrite", "true"]
    return command


def run_stage(stage: Stage, out: Path, by_name: Mapping[str, Stage], identities: Mapping[str, str], *,
              group: str, forced: bool, root: Path = Path("."), in_process: bool = False) -> dict[str, Any]:
    """Run one stage whose inputs are done (or return its cached result); returns its DONE record.

    A training stage runs its ``llama2-lit fit`` command in a subprocess (a clean process per stage,
    as a user would run it), or with ``in_process`` in this one."""
    stage_dir = out / stage.name
    key = stage_key(stage, identities, root)
    done = read_marker(out, stage)
    if done is not None and done.get("key") == key and not forced:
        return {**done, "status": "cached"}
    started = read_marker(out, stage, STARTED_FILE)
    resume = (not forced and stage.is_training and started is not None and started.get("key") == key
              and (stage_dir / CHECKPOINT).exists())
    if not resume and stage_dir.exists():
        shutil.rmtree(stage_dir)  # an old result or a run under another key: nothing of it is reused
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / DONE_FILE).unlink(missing_ok=True)
    _write_json(stage_dir / STARTED_FILE, {"key": key})
    start = time.time()
    if stage.is_training:
        command = fit_command(stage, out, by_name, group=group, resume=resume, progress_bar=sys.stdout.isatty())
        print(f"  $ {' '.join(command[1:])}", flush=True)
        if in_process:  # the same command line, without a new interpreter and imports (tests)
            from llama2_lit.stages.cli import lightning_main

            status = lightning_main(command[3:])
        else:
            status = subprocess.run(command).returncode
        if status != 0:
            raise PipelineError(f"stage {stage.name!r}: `llama2-lit fit` exited with status {status} (its error is "
                                f"above); fix it and run the pipeline again: finished stages are kept"
                                + (" (this one resumes from its last checkpoint, if it wrote one)"
                                   if stage.is_training else ""))
        summary: dict[str, Any] = {"command": command[1:]}
    else:
        summary = stage.function(stage_dir, **resolve(dict(stage.params), out, by_name)) or {}
    for name in stage.outputs:
        if not output_path(out, stage, name).exists():
            raise RuntimeError(f"stage {stage.name!r} finished without writing its output "
                               f"{output_path(out, stage, name)}")
    seconds = time.time() - start
    record = {"key": key, "identity": f"{key}-{time.time_ns()}", "seconds": seconds, "resumed": resume,
              "summary": summary}
    _write_json(stage_dir / DONE_FILE, record)
    return {**record, "status": "resumed" if resume else "ran"}


def run_graph(stages: Sequence[Stage], out: str | Path, *, force: Iterable[str] = (), group: str | None = None,
              root: Path = Path("."), in_process: bool = False) -> dict[str, dict[str, Any]]:
    """Every stage in order, skipping the cached ones, with a live stage display; returns each DONE record."""
    check_graph(stages)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    force = list(force)
    forced = downstream(stages, select(stages, force))
    by_name = {s.name: s for s in stages}
    group = group or f"pipeline-{out.resolve().name}"
    display = StageDisplay(stages, plan(stages, out, force, root))
    records: dict[str, dict[str, Any]] = {}
    identities: dict[str, str] = {}
    for stage in stages:
        display.start(stage.name)
        records[stage.name] = run_stage(stage, out, by_name, identities, group=group, forced=stage.name in forced,
                                        root=root, in_process=in_process)
        identities[stage.name] = records[stage.name]["identity"]
        display.finish(stage.name, records[stage.name])
    display.close()
    return records


class StageDisplay:
    """The stages and what each is doing: the plan first, then a line as each stage starts and ends
    (cached / ran / resumed, its seconds, the pipeline's elapsed time)."""

    def __init__(self, stages: Sequence[Stage], status: Mapping[str, str], stream: Any = None) -> None:
        self.names = [s.name for s in stages]
        self.about = {s.name: s.about for s in stages}
        self.status = dict(status)
        self.stream = stream or sys.stdout
        self.begin = time.time()
        self.width = max(map(len, self.names))
        todo = sum(1 for v in self.status.values() if v != "cached")
        self._print(f"pipeline: {len(self.names)} stages, {len(self.names) - todo} cached, {todo} to run")
        for i, name in enumerate(self.names, start=1):
            self._print(f"  {i:>2}. {name:<{self.width}}  {self.status[name]:<7} {self.about[name]}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def _prefix(self, name: str) -> str:
        return f"[{self.names.index(name) + 1:>2}/{len(self.names)} {name:<{self.width}}]"

    def start(self, name: str) -> None:
        if self.status[name] != "cached":
            self._print(f"{self._prefix(name)} running   (pipeline {self._elapsed()})")

    def finish(self, name: str, record: Mapping[str, Any]) -> None:
        self.status[name] = record["status"]
        self._print(f"{self._prefix(name)} {record['status']:<9} {record['seconds']:7.1f} s   "
                    f"(pipeline {self._elapsed()})")

    def close(self) -> None:
        self._print(f"pipeline done in {self._elapsed()}")

    def _elapsed(self) -> str:
        seconds = time.time() - self.begin
        return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
    partial.replace(path)


# ------------------------------------------------------------------------------------- the recipe
WORLD = "data/world"
TOKENIZER = "data/tokenizer/toy-4096.model"


@dataclass(frozen=True)
class Budget:
    """How much of each stage a size runs in the demo (the configs' own values are for a full run)."""

    pretrain: tuple[tuple[str, Any], ...] = ()
    sft: tuple[tuple[str, Any], ...] = ()
    reward: tuple[tuple[str, Any], ...] = ()
    ppo: tuple[tuple[str, Any], ...] = ()
    rejection_sampling: tuple[tuple[str, Any], ...] = ()
    gatt: tuple[tuple[str, Any], ...] = ()
    context_distillation: tuple[tuple[str, Any], ...] = ()
    annotate_prompts: int = 64        # per version: train prompts
    annotate_eval_prompts: int = 48   # per version: held-out prompts (the pairs the RMs are tested on)
    # The two arms' temperatures, one pair per share of the prompts (``sampling.annotate``): the low
    # one against every temperature the rejection-sampling sweep tries, so the RMs have ranked the
    # samples they will be asked to rank (paper 3.2.1 "vary the temperature hyper-parameter").
    annotate_temperatures: tuple[tuple[float, float], ...] = ((0.6, 0.8), (0.6, 1.0), (0.6, 1.2), (0.6, 1.4))
    annotate_weight: float = 1.0      # how often each annotated batch is repeated in the RMs' one epoch
    gatt_dialogs: int = 64
    gatt_require_adherence: bool = True
    gatt_eval_dialogs: int = 64       # held-out dialogs of the adherence table (Table 30)
    distill_prompts: int = 64
    # SFT dialogs replayed beside the Ghost Attention and context-distillation sets (the share of
    # sft_train.jsonl, as a train weight). The paper fine-tunes on those sets without saying what
    # else is in the batches; on its own, a set of a few dozen dialogs repeated for the budget's
    # steps teaches a small model to answer everything the same way (micro demo, world v10: context
    # distillation on 30 refusals raised false refusals from 0.39 to 1.00 and dropped seen-task
    # helpfulness from 0.23 to 0.08; with 2% of the SFT dialogs, 0.33 and 0.34).
    gatt_replay: float = 0.01
    distill_replay: float = 0.02
    rs_prompts: int = 256             # per version
    rs_samples: int = 8               # K
    rs_temperature: float | None = None  # None: the temperature sweep picks it (Fig 8)
    eval_prompts: int = 100
    max_new_tokens: int = 64
    static_pairs: int | None = None  # held-out static pairs per file for the RM tables (None: all)
    check: tuple[tuple[str, Any], ...] = ()  # world_check's n_* and max_new_tokens (the SFT model's preconditions)


def _steps(steps: int, every: int) -> tuple[tuple[str, Any], ...]:
    return (("--trainer.max_steps", steps), ("--trainer.val_check_interval", every),
            ("--checkpoint.every_n_train_steps", every))


BUDGETS: dict[str, Budget] = {
    # CI: the whole graph in ~3 minutes on 2 cores; every stage trains a few steps.
    # Fewer SFT steps leave a model that answers with EOS alone (nothing to annotate).
    "nano": Budget(pretrain=_steps(60, 30), sft=_steps(60, 60),
                   reward=_steps(10, 10) + (("--trainer.limit_val_batches", 2),),
                   ppo=(("--trainer.max_steps", 12), ("--trainer.val_check_interval", 3),  # 3 iterations
                        ("--checkpoint.every_n_train_steps", 12), ("--trainer.limit_val_batches", 1)),
                   gatt=_steps(10, 10) + (("--trainer.limit_val_batches", 2),),
                   context_distillation=_steps(10, 10) + (("--trainer.limit_val_batches", 2),),
                   rejection_sampling=_steps(10, 10) + (("--trainer.limit_val_batches", 2),
                                                         ("--trainer.check_val_every_n_epoch", "null")),
                   rs_prompts=32, rs_samples=4,  # rs_temperature: None, the sweep picks it (Fig 8)
                   # 96: on world v9, v1/rs_sft answered 27 of 48 prompts with EOS alone and the other
                   # 21 were ties, so version 2 had no pair to train on; 144 (of the small world's 300):
                   # on world v10 it answered 64 of 96 with EOS alone and the other 32 tied.
                   annotate_prompts=144, annotate_eval_prompts=48, gatt_dialogs=16, gatt_require_adherence=False,
                   gatt_eval_dialogs=16, distill_prompts=128,
                   eval_prompts=8, max_new_tokens=24, static_pairs=200,
                   check=(("n_gatt", 8), ("n_safety", 16), ("n_borderline", 16), ("n_best_of", 4), ("n_tasks", 8),
                          ("ks", (1, 4)), ("temperatures", (0.6,)), ("max_new_tokens", 24))),
    # The demo: 20 minutes on 2 cores for everything. Not measured end to end yet; the estimates
    # (quiet cores) are pretrain ~3.5 min, SFT ~2.5, the four reward models ~1 each, PPO ~1.5,
    # annotation, GAtt/CD data and fine-tuning ~3 together, the evaluation ~1.5.
    "micro": Budget(pretrain=(), sft=(),  # the configs' own runs: 600 pretraining steps, 2 SFT epochs
                    # One validation at the end, over every held-out pair (the static ones and this
                    # version's fresh ones come one after the other: a batch limit would cut the fresh ones).
                    reward=_steps(120, 120) + (("--trainer.limit_val_batches", 1.0),),
                    ppo=(("--trainer.max_steps", 80), ("--trainer.val_check_interval", 5),  # 20 iterations
                         ("--checkpoint.every_n_train_steps", 40), ("--trainer.limit_val_batches", 1)),
                    gatt=_steps(60, 60) + (("--trainer.limit_val_batches", 5),),
                    context_distillation=_steps(40, 40) + (("--trainer.limit_val_batches", 5),),
                    rejection_sampling=_steps(60, 60) + (("--trainer.limit_val_batches", 5),
                                                          ("--trainer.check_val_every_n_epoch", "null")),
                    rs_prompts=128, rs_samples=8,
                    # Fresh pairs that weigh in the RMs' training: 1,024 prompts give ~440 pairs (the
                    # rest tie), repeated 8 times, about a fifth of what each RM sees. With 192 prompts
                    # at weight 1 (51 pairs in 15,000) the v1 helpfulness RM scored 0.33 on held-out
                    # on-policy pairs and rated T=1.4 babble above correct answers; with these, 0.77.
                    annotate_prompts=1024, annotate_eval_prompts=192, annotate_weight=8.0,
                    gatt_dialogs=96, distill_prompts=128,
                    eval_prompts=64, max_new_tokens=48),
}


def config_path(size: str, name: str) -> str:
    path = Path("configs") / size / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config for stage {name!r} at size {size!r}: {path}")
    return str(path)


def _config_list(config: str, *keys: str) -> list[Any]:
    value: Any = yaml.safe_load(Path(config).read_text())
    for key in keys:
        value = value[key]
    return list(value)


def recipe(size: str = "micro", versions: int = 2, budget: Budget | None = None) -> list[Stage]:
    """The paper's order at toy scale (module docstring), as stages."""
    if versions < 1:
        raise ValueError(f"versions must be at least 1, got {versions}")
    b = budget or BUDGETS.get(size, Budget())
    stages = [
        Stage("world", function=world_stage, outputs={}, about="toy world + tokenizer"),
        Stage("pretrain", ("world",), config=config_path(size, "pretrain"), overrides=b.pretrain,
              about="pretraining (2.2)"),
        Stage("sft", ("pretrain",), config=config_path(size, "sft"),
              overrides=(("--model.init_args.init_from", "${pretrain}"), *b.sft), about="SFT (3.1)"),
        Stage("check", ("sft",), function=world_check_stage, params={"model": "${sft}", **dict(b.check)},
              outputs={"results": "check.json", "table": "check.txt"}, tags=("report",),
              about="the RLHF stages' preconditions on the SFT model (world check)"),
    ]
    policy = "sft"  # the latest policy: each version's rejection-sampling fine-tuning replaces it (3.2.3)
    annotated: list[str] = []
    rms: dict[str, str] = {}
    for v in range(1, versions + 1):
        annotate = f"v{v}/annotate"
        stages.append(Stage(annotate, (policy,), function=annotate_stage,
                            params={"policy": f"${{{policy}}}", "prompts": f"{WORLD}/rl_prompts_train.jsonl",
                                    "eval_prompts": f"{WORLD}/rl_prompts_eval.jsonl", "version": v,
                                    "num_prompts": b.annotate_prompts, "num_eval_prompts": b.annotate_eval_prompts,
                                    "max_new_tokens": b.max_new_tokens, "temperatures": b.annotate_temperatures},
                            outputs={"train": "train.jsonl", "eval": "eval.jsonl"}, tags=("annotate", f"v{v}"),
                            about=f"RLHF-V{v}: pairs on {policy}'s samples (3.2.1)"))
        annotated.append(annotate)
        for kind in ("helpfulness", "safety"):
            config = config_path(size, f"reward_{kind}")
            train = _config_list(config, "data", "init_args", "train_files")
            weights = _config_list(config, "data", "init_args", "train_weights")
            val = _config_list(config, "data", "init_args", "val_files")
            name = f"v{v}/rm_{kind}"
            stages.append(Stage(name, ("sft", *annotated), config=config, overrides=(
                ("--model.init_args.init_from", "${sft}"),
                ("--data.init_args.train_files", [*train, *(f"${{{a}.train}}" for a in annotated)]),
                ("--data.init_args.train_weights", [*weights, *([b.annotate_weight] * len(annotated))]),
                ("--data.init_args.val_files", [*val, f"${{{annotate}.eval}}"]), *b.reward),
                tags=("rm", f"v{v}"), about=f"RLHF-V{v}: {kind} RM on static + {len(annotated)} annotated batch(es)"))
            rms[kind] = name
        # Rejection sampling from the latest policy with this version's RMs, pooled with every earlier
        # version's kept samples, then SFT on the pool's best (3.2.3); its model is the next policy.
        rs, earlier = f"v{v}/rs", [f"v{k}/rs" for k in range(1, v)]
        stages.append(Stage(rs, (policy, rms["helpfulness"], rms["safety"], *earlier[-1:]),
                            function=rejection_sampling_stage, params={
                                "policy": f"${{{policy}}}", "rm_helpfulness": f"${{{rms['helpfulness']}}}",
                                "rm_safety": f"${{{rms['safety']}}}",
                                "previous_pool": f"${{{earlier[-1]}.pool}}" if earlier else None,
                                "prompts": f"{WORLD}/rl_prompts_train.jsonl", "version": v,
                                "num_prompts": b.rs_prompts, "num_samples": b.rs_samples,
                                "temperature": b.rs_temperature, "max_new_tokens": b.max_new_tokens},
                            outputs={"train": "train.jsonl", "pool": "pool.jsonl"}, tags=("rs", f"v{v}"),
                            about=f"RLHF-V{v}: best-of-{b.rs_samples} from {policy} by the V{v} RMs, pooled (3.2.3)"))
        stages.append(Stage(f"{rs}_sft", (policy, rs), config=config_path(size, "rejection_sampling"), overrides=(
            ("--model.init_args.init_from", f"${{{policy}}}"), ("--data.init_args.train_files", [f"${{{rs}.train}}"]),
            *b.rejection_sampling), tags=("rs", f"v{v}"), about=f"RLHF-V{v}: fine-tuning on the pool's best"))
        policy = f"{rs}_sft"
    stages.append(Stage("ppo", (policy, rms["helpfulness"], rms["safety"]), config=config_path(size, "ppo"), overrides=(
        ("--model.init_args.init_from", f"${{{policy}}}"),
        ("--model.init_args.value_from", f"${{{rms['helpfulness']}}}"),
        ("--model.init_args.reward_helpfulness", f"${{{rms['helpfulness']}}}"),
        ("--model.init_args.reward_safety", f"${{{rms['safety']}}}"), *b.ppo),
        tags=("ppo", f"v{versions}"), about=f"RLHF-V{versions}: PPO from {policy} (3.2.3)"))
    stages += [
        Stage("gatt/data", ("ppo",), function=gatt_data_stage,
              params={"policy": "${ppo}", "dialogs": f"{WORLD}/gatt_train.jsonl", "num_dialogs": b.gatt_dialogs,
                      "require_adherence": b.gatt_require_adherence, "max_new_tokens": b.max_new_tokens},
              outputs={"train": "train.jsonl"}, tags=("gatt",), about="Ghost Attention data from PPO (3.3)"),
        Stage("gatt/sft", ("ppo", "gatt/data"), config=config_path(size, "gatt"), overrides=(
            ("--model.init_args.init_from", "${ppo}"),
            ("--data.init_args.train_files", ["${gatt/data.train}", f"{WORLD}/sft_train.jsonl"]),
            ("--data.init_args.train_weights", [1.0, b.gatt_replay]), *b.gatt),
            tags=("gatt",), about="Ghost Attention fine-tuning (3.3)"),
        Stage("cd/data", ("gatt/sft", rms["safety"]), function=context_distillation_stage,
              params={"policy": "${gatt/sft}", "safety_rm": f"${{{rms['safety']}}}",
                      "prompts": f"{WORLD}/rl_prompts_train.jsonl", "num_prompts": b.distill_prompts,
                      "max_new_tokens": b.max_new_tokens},
              outputs={"train": "train.jsonl"}, tags=("cd",), about="context distillation data (4.2.4)"),
        Stage("cd/sft", ("gatt/sft", "cd/data"), config=config_path(size, "context_distillation"), overrides=(
            ("--model.init_args.init_from", "${gatt/sft}"),
            ("--data.init_args.train_files", ["${cd/data.train}", f"{WORLD}/sft_train.jsonl"]),
            ("--data.init_args.train_weights", [1.0, b.distill_replay]), *b.context_distillation),
            tags=("cd",), about="safety context distillation (4.2.4)"),
    ]
    models = {"pretrained": "pretrain", "sft": "sft", **{f"rejection sampling V{v}": f"v{v}/rs_sft" for v in
                                                         range(1, versions + 1)},
              "ppo": "ppo", "gatt": "gatt/sft", "context distillation": "cd/sft"}
    rm_stages = [s.name for s in stages if "rm" in s.tags]
    stages.append(Stage("evaluate", (*models.values(), *annotated, *rm_stages), function=evaluate_stage, params={
        "models": {label: f"${{{name}}}" for label, name in models.items()},
        "reward_models": {name: f"${{{name}}}" for name in rm_stages},
        "fresh_pairs": {a.split("/")[0]: f"${{{a}.eval}}" for a in annotated},
        "eval_prompts": b.eval_prompts, "max_new_tokens": b.max_new_tokens, "static_pairs": b.static_pairs,
        "gatt_dialogs": b.gatt_eval_dialogs},
        outputs={"results": "results.json", "table": "results.md"}, tags=("report",),
        about="the evaluation suite on every stage's model"))
    from llama2_lit.report import report_stage

    stages.append(Stage("report", tuple(s.name for s in stages), function=report_stage, params={
        "size": size, "results": "${evaluate.results}"},
        outputs={"markdown": "report.md", "html": "report.html"}, tags=("report",), about="report.md + plots + html"))
    check_graph(stages)
    return stages


# ------------------------------------------------------------------------------------- function stages
def world_stage(stage_dir: Path, *, size: str = "default", seed: int = 0) -> dict[str, Any]:
    """The toy world and its tokenizer where the configs expect them (generated on first use)."""
    from llama2_lit.stages.toy_world import ensure_toy_assets

    world, tokenizer = ensure_toy_assets(size=size, seed=seed)
    manifest = (world / "manifest.json").read_bytes()
    return {"world": str(world), "tokenizer": str(tokenizer), "manifest": hashlib.sha256(manifest).hexdigest()[:16]}


def _policy(checkpoint: str, tokenizer: str | None = None):
    from llama2_lit.checkpoints import load_model
    from llama2_lit.tokenizer import Tokenizer

    return load_model(checkpoint).eval(), Tokenizer(tokenizer or TOKENIZER)


def world_check_stage(stage_dir: Path, *, model: str, **sizes: Any) -> dict[str, Any]:
    """Does the SFT model leave every later stage room to show (``llama2_lit.world_check``)? The
    same table as ``llama2-lit world check``, kept for the report."""
    from llama2_lit.world_check import format_world_check, world_check

    policy, tokenizer = _policy(model)
    result = world_check(policy, tokenizer, WORLD, **{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})
    (stage_dir / "check.json").write_text(json.dumps(result, indent=1))
    (stage_dir / "check.txt").write_text(format_world_check(result) + "\n")
    return {key: result[key] for key in ("violation_adversarial", "false_refusal", "task_accuracy")}


def annotate_stage(stage_dir: Path, *, policy: str, prompts: str, eval_prompts: str, version: int, num_prompts: int,
                   num_eval_prompts: int, max_new_tokens: int,
                   temperatures: tuple[tuple[float, float], ...] = ((0.6, 1.0),)) -> dict[str, Any]:
    """Fresh pairs for one RLHF version: two samples per prompt from the latest policy at two
    temperatures (one pair of ``temperatures`` per share of the prompts), annotated by the oracle
    (``sampling.annotate``). Each version takes the next slice of the prompts (fresh prompts);
    held-out prompts give the pairs its RMs are tested on. Ties (equal oracle scores: frequent for
    a weak policy, whose answers mostly score 0) give no pair."""
    from dataclasses import asdict

    from llama2_lit.data.records import load_records, write_records
    from llama2_lit.sampling.annotate import Sampler, annotate_on_policy

    slices = {}
    for split, path, n in (("train", prompts, num_prompts), ("eval", eval_prompts, num_eval_prompts)):
        available = load_records(path, "prompts")
        slices[split] = available[(version - 1) * n: version * n]
        if not slices[split]:
            raise PipelineError(f"{path} has {len(available)} prompts: none left for the {split} annotation of "
                                f"version {version} at {n} per version (fewer versions or fewer prompts per version)")
    model, tokenizer = _policy(policy)
    summary = {}
    for split, records in slices.items():
        pairs, stats = annotate_on_policy(records, tokenizer, [Sampler(model, low) for low, _ in temperatures],
                                          [Sampler(model, high) for _, high in temperatures],
                                          max_new_tokens=max_new_tokens, seed=version)
        if not pairs:
            raise PipelineError(f"{split} annotation of version {version} produced no pairs: {asdict(stats)}")
        write_records(pairs, stage_dir / f"{split}.jsonl", "preference")
        summary[split] = asdict(stats)
    return summary


def rejection_sampling_stage(stage_dir: Path, *, policy: str, rm_helpfulness: str, rm_safety: str,
                             previous_pool: str | None, prompts: str, version: int, num_prompts: int,
                             num_samples: int, temperature: float | None, max_new_tokens: int) -> dict[str, Any]:
    """One rejection-sampling iteration (``sampling.rejection.run_rejection_sampling_iteration``) without
    its fine-tuning (the next stage): best-of-K from the latest policy by R_c, added to the pool of the
    earlier versions (copied from ``previous_pool``), and the fine-tuning set drawn from the pool.
    Each version samples the next slice of the prompts."""
    from llama2_lit.data.records import load_records, write_records
    from llama2_lit.sampling.rejection import run_rejection_sampling_iteration

    if previous_pool is not None:
        shutil.copy(previous_pool, stage_dir / "pool.jsonl")
    records = load_records(prompts, "prompts")[(version - 1) * num_prompts: version * num_prompts]
    write_records(records, stage_dir / "prompts.jsonl", "prompts")
    summary = run_rejection_sampling_iteration(
        policy, rm_helpfulness, rm_safety, stage_dir / "prompts.jsonl", stage_dir, iteration=version,
        num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens, sweep_prompts=24,
        tokenizer_path=TOKENIZER, wandb=False)
    shutil.copy(stage_dir / f"iteration-{version}" / "train.jsonl", stage_dir / "train.jsonl")
    return {key: value for key, value in summary.items() if key != "curves"} | {"curves": summary.get("curves")}


def gatt_data_stage(stage_dir: Path, *, policy: str, dialogs: str, num_dialogs: int | None, require_adherence: bool,
                    max_new_tokens: int, tokenizer: str | None = None) -> dict[str, Any]:
    """Ghost Attention dialogs sampled from the latest RLHF model (``sampling.gatt``); also ``llama2-lit gatt``."""
    from llama2_lit.data.records import load_records, write_records
    from llama2_lit.sampling.gatt import synthesize_gatt_data

    model, tokenizer = _policy(policy, tokenizer)
    records, summary = synthesize_gatt_data(model, tokenizer, load_records(dialogs, "chat")[:num_dialogs],
                                            max_new_tokens=max_new_tokens, require_adherence=require_adherence)
    if not records:
        raise PipelineError(f"no Ghost Attention dialog met its constraints ({summary}); sample more dialogs or "
                           "turn the adherence filter off (Budget.gatt_require_adherence)")
    write_records(records, stage_dir / "train.jsonl", "chat")
    return summary


def context_distillation_stage(stage_dir: Path, *, policy: str, safety_rm: str, prompts: str, num_prompts: int | None,
                               max_new_tokens: int, tokenizer: str | None = None) -> dict[str, Any]:
    """Safety context distillation data on adversarial prompts, kept where the safety RM prefers the
    distilled answer (``sampling.context_distillation``, Fig 16b); also ``llama2-lit distill``."""
    from llama2_lit.data.records import load_records, write_records
    from llama2_lit.reward_metrics import load_reward_model
    from llama2_lit.sampling.context_distillation import distill_safety_context

    model, tokenizer = _policy(policy, tokenizer)
    adversarial = [r for r in load_records(prompts, "prompts") if r.get("is_safety")][:num_prompts]
    records, summary = distill_safety_context(model, load_reward_model(safety_rm), tokenizer, adversarial,
                                              max_new_tokens=max_new_tokens)
    # An empty distilled answer is no chat record (the safety RM may still score it above the other).
    kept = [r for r in records if r["messages"][-1]["content"].strip()]
    summary["dropped_empty_answer"] = len(records) - len(kept)
    records = kept
    if not records:
        raise PipelineError(f"the safety RM kept no distilled answer of {len(adversarial)} prompts")
    write_records(records, stage_dir / "train.jsonl", "chat")
    return summary


def evaluate_stage(stage_dir: Path, *, models: dict[str, str], reward_models: dict[str, str],
                   fresh_pairs: dict[str, str], eval_prompts: int, max_new_tokens: int,
                   static_pairs: int | None = None, gatt_dialogs: int = 64) -> dict[str, Any]:
    """The evaluation suite on every stage's model; every version's RMs on the static held-out pairs
    (Table 8; the first ``static_pairs`` of each file) and on every version's fresh pairs; constraint
    adherence by turn on ``gatt_dialogs`` held-out dialogs (plus a few with a held-out constraint type,
    Fig 28) before and after Ghost Attention (Table 30). ``llama2_lit.report`` lays the results out."""
    from llama2_lit.data.records import load_records
    from llama2_lit.evaluation import Decoding, evaluate_checkpoints, reward_model_accuracy, results_markdown
    from llama2_lit.reward_metrics import load_reward_model
    from llama2_lit.tokenizer import Tokenizer

    last = {kind: max((n for n in reward_models if n.endswith(f"rm_{kind}")), key=version_of) for kind in
            ("helpfulness", "safety")}
    results = evaluate_checkpoints(
        models, baseline="sft", world=WORLD,
        tokenizer_path=TOKENIZER, prompts_per_suite=eval_prompts, decoding=Decoding(max_new_tokens=max_new_tokens),
        reward_models={kind: reward_models[name] for kind, name in last.items()})  # they judge the win rates
    tokenizer = Tokenizer(TOKENIZER)
    fresh = {version: load_records(path, "preference") for version, path in fresh_pairs.items()}
    static = {"helpfulness": load_records(f"{WORLD}/preference_helpful_eval.jsonl", "preference")[:static_pairs],
              "safety": load_records(f"{WORLD}/preference_safety_eval.jsonl", "preference")[:static_pairs]}
    versions: dict[str, Any] = {}
    for name, checkpoint in reward_models.items():
        model = load_reward_model(checkpoint)
        kind = name.rsplit("rm_", 1)[1]
        versions[name] = {"static": reward_model_accuracy(model, tokenizer, static[kind], by_kind=True),
                          "fresh": {v: reward_model_accuracy(model, tokenizer, records)["avg"]
                                    for v, records in fresh.items()},
                          "fresh_pairs": {v: len(records) for v, records in fresh.items()}}
    results["reward_model_versions"] = versions
    # Table 30: constraint adherence turn by turn, before Ghost Attention (the PPO model) and after;
    # "trained" counts the constraint types of the training data only, and each held-out type has
    # its own row (the zero-shot test of Fig 28). Dialogs with a held-out type are rare in the file:
    # beyond the first ``gatt_dialogs``, enough of them are added for that row to mean something.
    from llama2_lit.checkpoints import load_model
    from llama2_lit.data.constraints import HELD_OUT_CONSTRAINT_TYPES, TRAINED_CONSTRAINT_TYPES
    from llama2_lit.evaluation import adherence_by_turn, constraint_rollouts

    def held_out(record: dict[str, Any]) -> bool:
        return any(spec["type"] in HELD_OUT_CONSTRAINT_TYPES for spec in record["meta"]["constraints"])

    every_dialog = load_records(f"{WORLD}/gatt_eval.jsonl", "prompts")
    dialogs = every_dialog[:gatt_dialogs]
    missing = max(4, gatt_dialogs // 8) - sum(map(held_out, dialogs))
    dialogs += [r for r in every_dialog[gatt_dialogs:] if held_out(r)][:max(0, missing)]
    results["adherence_dialogs"] = {kind: sum(kind in {s["type"] for s in r["meta"]["constraints"]} for r in dialogs)
                                    for kind in (*TRAINED_CONSTRAINT_TYPES, *HELD_OUT_CONSTRAINT_TYPES)}
    results["adherence_dialogs"]["all"] = len(dialogs)
    results["adherence_dialogs"]["trained"] = sum(
        any(spec["type"] in TRAINED_CONSTRAINT_TYPES for spec in r["meta"]["constraints"]) for r in dialogs)
    results["adherence_by_turn"] = {}
    for label in ("ppo", "gatt", "context distillation"):
        if label in models:
            rollouts = constraint_rollouts(load_model(models[label]).eval(), tokenizer, dialogs,
                                           max_new_tokens=max_new_tokens)
            table = adherence_by_turn(rollouts)
            table["trained"] = adherence_by_turn(rollouts, types=TRAINED_CONSTRAINT_TYPES).get("all", {})
            results["adherence_by_turn"][label] = table
    _write_json(stage_dir / "results.json", results)
    (stage_dir / "results.md").write_text(results_markdown(results))
    return {"models": list(results["models"])}


def version_of(stage_name: str) -> int:
    """The RLHF version of a stage named ``v<k>/...``."""
    return int(stage_name.split("/")[0].lstrip("v"))


# ------------------------------------------------------------------------------------- entry point
def run_pipeline(size: str = "micro", out: str | Path = "runs/demo", *, versions: int = 2, fresh: bool = False,
                 force: Sequence[str] = (), budget: Budget | None = None, group: str | None = None,
                 in_process: bool = False) -> Path:
    """The recipe (``recipe``) under ``out``; returns ``OUT/report.md``. ``fresh`` deletes ``out`` first."""
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    stages = recipe(size, versions, budget)
    run_graph(stages, out, force=force, group=group or f"demo-{size}-{out.resolve().name}", in_process=in_process)
    return out / "report.md"


if __name__ == "__main__":  # ``python -m llama2_lit.pipeline ...`` = ``llama2-lit demo ...``
    from llama2_lit.cli import main

    main(["demo", *sys.argv[1:]])
