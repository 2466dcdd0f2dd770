"""The notebooks' shared set-up: the scale switch and what setup() prints and does."""

from __future__ import annotations

import random

import pytest
import torch

from llama2_lit.notebook import SCALE_VARIABLE, pick, repo_root, setup


def test_pick_follows_the_scale_variable(monkeypatch):
    monkeypatch.delenv(SCALE_VARIABLE, raising=False)
    assert pick(ci="nano", full="micro") == "nano"
    monkeypatch.setenv(SCALE_VARIABLE, "full")
    assert pick(ci="nano", full="micro") == "micro"
    monkeypatch.setenv(SCALE_VARIABLE, "huge")
    with pytest.raises(ValueError, match="choose one of"):
        pick(ci="nano", full="micro")


def test_setup_seeds_sets_threads_moves_to_the_root_and_prints_versions(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(SCALE_VARIABLE, raising=False)
    root = repo_root()
    monkeypatch.chdir(root / "notebooks")
    threads = torch.get_num_threads()
    try:
        done = setup(5, threads=1, at_repo_root=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert done.root == root and done.seed == 5 and done.threads == 1 and done.scale == "ci"
    assert f"torch {torch.__version__}" in printed and "Lightning 2." in printed
    assert "seed 5 | 1 thread | scale ci" in printed
    first = (random.random(), torch.rand(1).item())
    setup(5)
    assert (random.random(), torch.rand(1).item()) == first
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no llama2_lit checkout"):
        repo_root()
