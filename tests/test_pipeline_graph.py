"""The pipeline's graph logic without training: which stages `--force` reruns, when a cached stage
is invalidated, when an interrupted training stage resumes, and how stage outputs are wired into
`llama2-lit fit` command lines. Pure functions on small graphs; fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from llama2_lit.pipeline import (
    CHECKPOINT, DONE_FILE, STARTED_FILE, PipelineError, Stage, check_graph, downstream, fit_command,
    plan, recipe, run_graph, select, stage_key,
)
from llama2_lit.report import markdown_to_html

CALLS: list[str] = []


def write_text(stage_dir: Path, *, text: str, name: str, source: str | None = None) -> dict:
    """A function stage: writes ``text`` (after the content of ``source``, another stage's output)."""
    CALLS.append(name)
    prefix = Path(source).read_text() if source else ""
    (stage_dir / "out.txt").write_text(prefix + text)
    return {"chars": len(prefix + text)}


def chain(a_text: str = "a") -> list[Stage]:
    """a -> b -> c, and d (independent of a) -> c."""
    out = {"text": "out.txt"}
    return [
        Stage("a", function=write_text, params={"text": a_text, "name": "a"}, outputs=out),
        Stage("b", ("a",), function=write_text, params={"text": "b", "name": "b", "source": "${a}"}, outputs=out,
              tags=("middle",)),
        Stage("d", function=write_text, params={"text": "d", "name": "d"}, outputs=out),
        Stage("c", ("b", "d"), function=write_text, params={"text": "c", "name": "c", "source": "${b.text}"},
              outputs=out),
    ]


def test_force_rm_reruns_exactly_the_stages_downstream_of_the_reward_models():
    stages = recipe("nano", versions=2)
    assert select(stages, ["rm"]) == {"v1/rm_helpfulness", "v1/rm_safety", "v2/rm_helpfulness", "v2/rm_safety"}
    assert downstream(stages, select(stages, ["rm"])) == {
        "v1/rm_helpfulness", "v1/rm_safety", "v1/rs", "v1/rs_sft", "v2/annotate", "v2/rm_helpfulness", "v2/rm_safety",
        "v2/rs", "v2/rs_sft", "ppo", "gatt/data", "gatt/sft", "cd/data", "cd/sft", "evaluate", "report"}
    # Version 2 annotates the samples of version 1's rejection-sampling model; PPO starts from version 2's.
    by_name = {s.name: s for s in stages}
    assert by_name["v2/annotate"].inputs == ("v1/rs_sft",) and by_name["ppo"].inputs[0] == "v2/rs_sft"
    assert "v1/rs" in by_name["v2/rs"].inputs  # the pool of earlier versions
    # Versions: v2's reward models also read v1's pairs; v1's do not read v2's.
    assert "v2/rm_safety" in downstream(stages, {"v1/annotate"})
    assert "v1/rm_safety" not in downstream(stages, {"v2/annotate"})
    with pytest.raises(PipelineError, match="no stage has this name or tag"):
        select(stages, ["reward"])


def test_a_placeholder_must_name_a_declared_input_declared_earlier():
    good = chain()
    check_graph(good)
    with pytest.raises(PipelineError, match="not one of its inputs"):
        check_graph([good[0], Stage("b", function=write_text, params={"source": "${a}"})])
    with pytest.raises(PipelineError, match="has no output 'model'"):
        check_graph([good[0], Stage("b", ("a",), function=write_text, params={"source": "${a.model}"})])
    with pytest.raises(PipelineError, match="not a stage declared before it"):
        check_graph([Stage("b", ("a",), function=write_text), good[0]])
    with pytest.raises(PipelineError, match="declared twice"):
        check_graph([good[0], good[0]])
    with pytest.raises(PipelineError, match="directory would hold"):
        check_graph([good[0], Stage("a/data", function=write_text)])


def test_cached_stages_are_skipped_forced_ones_rerun_with_everything_downstream(tmp_path, capsys):
    CALLS.clear()
    run_graph(chain(), tmp_path)
    assert CALLS == ["a", "b", "d", "c"]
    assert (tmp_path / "c" / "out.txt").read_text() == "abc"
    assert set(plan(chain(), tmp_path).values()) == {"cached"}

    CALLS.clear()
    records = run_graph(chain(), tmp_path)
    assert CALLS == [] and {r["status"] for r in records.values()} == {"cached"}

    CALLS.clear()
    assert plan(chain(), tmp_path, force=["middle"]) == {"a": "cached", "b": "run", "d": "cached", "c": "run"}
    run_graph(chain(), tmp_path, force=["middle"])
    assert CALLS == ["b", "c"]
    assert "[ 2/4 b] ran" in capsys.readouterr().out  # the stage display


def test_a_changed_parameter_invalidates_the_stage_and_everything_downstream(tmp_path):
    CALLS.clear()
    run_graph(chain("a"), tmp_path)
    assert plan(chain("A"), tmp_path) == {"a": "run", "b": "run", "d": "cached", "c": "run"}
    CALLS.clear()
    run_graph(chain("A"), tmp_path)
    assert CALLS == ["a", "b", "c"] and (tmp_path / "c" / "out.txt").read_text() == "Abc"


def _finished(out: Path, stage: Stage, identities: dict[str, str]) -> str:
    """Mark ``stage`` finished (as ``run_stage`` would) and return its identity."""
    key = stage_key(stage, identities)
    (out / stage.name).mkdir(parents=True, exist_ok=True)
    (out / stage.name / DONE_FILE).write_text(json.dumps({"key": key, "identity": f"{key}-1", "seconds": 1.0}))
    return f"{key}-1"


def test_a_changed_config_file_reruns_its_training_stage_and_downstream_and_an_interrupted_one_resumes(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stage_key reads config files relative to the working directory
    Path("train.yaml").write_text("trainer: {max_steps: 10}\n")
    out = tmp_path / "out"
    stages = [Stage("data", function=write_text, params={"text": "x", "name": "data"}, outputs={"text": "out.txt"}),
              Stage("train", ("data",), config="train.yaml", overrides=(("--data.file", "${data}"),)),
              Stage("eval", ("train",), function=write_text, params={"text": "e", "name": "eval"},
                    outputs={"text": "out.txt"})]
    identities: dict[str, str] = {}
    for stage in stages:
        identities[stage.name] = _finished(out, stage, identities)
    assert set(plan(stages, out).values()) == {"cached"}

    Path("train.yaml").write_text("trainer: {max_steps: 20}\n")
    assert plan(stages, out) == {"data": "cached", "train": "run", "eval": "run"}

    # Interrupted under the new config: STARTED.json with the current key and a last checkpoint.
    (out / "train" / DONE_FILE).unlink()
    (out / "train" / STARTED_FILE).write_text(json.dumps({"key": stage_key(stages[1], identities)}))
    (out / "train" / CHECKPOINT).parent.mkdir(parents=True)
    (out / "train" / CHECKPOINT).write_text("weights")
    assert plan(stages, out) == {"data": "cached", "train": "resume", "eval": "run"}
    assert plan(stages, out, force=["train"])["train"] == "run"  # forced: from scratch

    by_name = {s.name: s for s in stages}
    command = fit_command(stages[1], out, by_name, group="g", resume=True)
    assert command[-2:] == ["--ckpt_path", "last"]
    assert command[command.index("--data.file") + 1] == str(out / "data" / "out.txt")


def test_reward_models_train_on_the_static_pairs_and_every_annotated_batch_so_far(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    stages = recipe("nano", versions=2)
    by_name = {s.name: s for s in stages}
    out = Path("OUT")
    command = fit_command(by_name["v2/rm_safety"], out, by_name, group="demo", resume=False)

    def value(option: str):
        return json.loads(command[command.index(option) + 1])

    assert value("--data.init_args.train_files") == [
        "data/world/preference_safety_train.jsonl", "data/world/preference_helpful_train.jsonl",
        "OUT/v1/annotate/train.jsonl", "OUT/v2/annotate/train.jsonl"]
    assert value("--data.init_args.train_weights") == [1.0, 0.0556, 1.0, 1.0]
    assert value("--data.init_args.val_files")[-1] == "OUT/v2/annotate/eval.jsonl"
    assert command[command.index("--model.init_args.init_from") + 1] == "OUT/sft/checkpoints/last.ckpt"
    assert command[command.index("--run.group") + 1] == "demo"
    ppo = fit_command(by_name["ppo"], out, by_name, group="demo", resume=False)
    assert ppo[ppo.index("--model.init_args.reward_safety") + 1] == "OUT/v2/rm_safety/checkpoints/last.ckpt"


def test_markdown_to_html_renders_the_report_subset():
    page = markdown_to_html("# T\n\ntext **bold** `code`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![plot](p.png)\n- x\n",
                            title="r")
    assert "<h1>T</h1>" in page and "<strong>bold</strong>" in page and "<code>code</code>" in page
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>" in page
    assert '<img alt="plot" src="p.png">' in page and "<ul><li>x</li></ul>" in page
