"""Every verb answers a known bad input with one line, ``llama2-lit <verb>: error: ...``, and exit
status 2: never a traceback. Most run in-process (``main([...])``), two as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

from llama2_lit.checkpoints import save_model
from llama2_lit.cli import main
from llama2_lit.config import ModelConfig
from llama2_lit.model import Transformer
from llama2_lit.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good files to spoil: a tokenizer, our folder, a stage's .ckpt; and spoiled ones."""
    root = tmp_path_factory.mktemp("errors")
    words = ["the", "cat", "sat", "on", "a", "mat", "Paris", "is", "in", "France", "what", "where"]
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 5)) for i in range(300)]
    tokenizer = train_tokenizer(None, root / "tok.model", 300, texts=texts)
    config = ModelConfig(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                         max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ours = save_model(model, config, root / "ours", tokenizer_path=tokenizer)
    ckpt = root / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "model_config": config.to_dict(), "tokenizer_path": str(tokenizer)}, ckpt)

    truncated_ckpt = root / "truncated.ckpt"
    truncated_ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    truncated_folder = root / "truncated"
    truncated_folder.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (truncated_folder / name).write_bytes((ours / name).read_bytes())
    weights = (ours / "model.safetensors").read_bytes()
    (truncated_folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    bad_config = root / "bad_config"
    bad_config.mkdir()
    (bad_config / "model.safetensors").write_bytes(weights)
    (bad_config / "config.json").write_text(json.dumps({**config.to_dict(), "n_heads": 5}))  # 64 % 5 != 0
    broken_json = root / "broken_json"
    broken_json.mkdir()
    (broken_json / "config.json").write_text('{"dim": 64, "n_layers": ')
    not_a_model = root / "not_a_tokenizer.model"
    not_a_model.write_text("this is not a SentencePiece model\n")
    bad_record = root / "bad.jsonl"
    bad_record.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    bad_csv = root / "bad_run"
    bad_csv.mkdir()
    (bad_csv / "metrics.csv").write_text("step,metric,value,time\nten,train/loss,1.0,0\n")
    return {"tokenizer": tokenizer, "ours": ours, "ckpt": ckpt, "truncated_ckpt": truncated_ckpt,
            "truncated_folder": truncated_folder, "bad_config": bad_config, "broken_json": broken_json,
            "not_a_model": not_a_model, "bad_record": bad_record, "bad_csv": bad_csv, "root": root}


# (verb arguments with {placeholders} for the files above, words the error line must contain)
BAD_INPUTS = {
    "missing checkpoint": (["generate", "{root}/nowhere", "--prompt", "hi"], ["checkpoint not found", "nowhere"]),
    "truncated .ckpt": (["generate", "{truncated_ckpt}", "--prompt", "hi"], ["truncated.ckpt", "not a readable"]),
    "truncated safetensors": (["chat", "{truncated_folder}"], ["model.safetensors", "not a readable safetensors"]),
    "not a SentencePiece model": (["generate", "{ours}", "--tokenizer", "{not_a_model}", "--prompt", "hi"],
                                  ["not_a_tokenizer.model", "not a SentencePiece model"]),
    "missing tokenizer": (["generate", "{ours}", "--tokenizer", "{root}/none.model", "--prompt", "hi"],
                          ["tokenizer model not found", "none.model"]),
    "bad sampling value": (["generate", "{ours}", "--top-p", "0", "--prompt", "hi"], ["--top-p"]),
    "config value out of range": (["convert", "{bad_config}", "{root}/out1"], ["config.json", "n_heads=5"]),
    "config.json not JSON": (["convert", "{broken_json}", "{root}/out2"], ["config.json", "invalid JSON at line 1"]),
    "a file that is no checkpoint": (["convert", "{bad_record}", "{root}/out3"], ["bad.jsonl", "a single file"]),
    "existing output": (["convert", "{ours}", "{ckpt}"], ["already exists", "--overwrite"]),
    "tokenize with a bad tokenizer": (["tokenize", "--tokenizer", "{not_a_model}", "hi"], ["not a SentencePiece"]),
    "dialog that breaks the chat format": (["tokenize", "--tokenizer", "{tokenizer}", "--chat", "{bad_record}"],
                                          ["messages[0]", "assistant"]),
    "--chat input that is not JSON": (["tokenize", "--tokenizer", "{tokenizer}", "--chat", "--text", "{{oops"],
                                      ["not JSON"]),
    "missing corpus": (["tokenizer", "train", "--input", "{root}/no.txt", "--vocab-size", "300", "--out",
                        "{root}/t.model"], ["no.txt"]),
    "bad record to convert": (["data", "convert", "{bad_record}", "{root}/out.jsonl", "--kind", "chat"],
                              ["bad.jsonl", "nothing written"]),
    "missing run": (["runs", "{root}/no_run"], ["no_run", "metrics.csv"]),
    "bad metrics line": (["runs", "{bad_csv}"], ["metrics.csv, line 2", "bad step"]),
    "not a sharded checkpoint": (["consolidate", "{ours}", "{root}/c.ckpt"], ["not a sharded checkpoint"]),
    "missing prompts": (["annotate", "{ours}", "--prompts", "{root}/none.jsonl", "--out", "{root}/p.jsonl"],
                        ["none.jsonl"]),
    "bad record to score": (["reward", "score", "{ours}", "--data", "{bad_record}", "--kind", "chat"],
                            ["bad.jsonl, line 1", "messages[0] (role 'assistant')"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_status_2(case, files, capsys):
    argv, words = BAD_INPUTS[case]
    argv = [arg.format(**files) for arg in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"llama2-lit {argv[0]}: error: "), err
    assert all(word in line for word in words), line


def test_a_bad_config_value_in_fit_is_one_error_line(tmp_path, capsys, monkeypatch):
    """jsonargparse wraps the data module's ValueError in its own; the line tells the original, and
    the run directory is not created (run.json is written only once everything is built)."""
    from llama2_lit.stages.toy_world import ensure_toy_assets

    ensure_toy_assets()
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "configs/nano/pretrain.yaml", "--run.dir", str(tmp_path / "run"),
              "--data.init_args.batch_size", "0", "--run.wandb", "false"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "llama2-lit fit: error: batch_size must be >= 1, got 0"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, words", [
    (["generate", "{truncated_ckpt}", "--prompt", "hi"], "not a readable PyTorch checkpoint"),
    (["tokenize", "--tokenizer", "{not_a_model}", "hi"], "not a SentencePiece model"),
])
def test_bad_input_in_a_real_process(argv, words, files):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LLAMA2_LIT_TRACEBACK", None)
    result = subprocess.run([sys.executable, "-m", "llama2_lit", *[a.format(**files) for a in argv]],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"llama2-lit {argv[0]}: error: ")
    assert words in result.stderr
