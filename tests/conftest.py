"""Shared test fixtures. Tests run offline (no W&B account, no Hugging Face hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Meta's real tokenizer lives beside the project (never copied into it); $LLAMA2_TOKENIZER may
# point at it elsewhere (the notebooks honour the same variable).
META_TOKENIZER = Path(os.environ.get("LLAMA2_TOKENIZER") or
                      REPO_ROOT.parent / "shared" / "assets" / "llama2-tokenizer.model")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test models are tiny: their ops are dispatch-bound, and on a shared 2-core machine a second
    OpenMP thread that gets descheduled stalls every op (measured: 10x slower steps). Session-wide,
    so that module fixtures (which pytest sets up before a test's own fixtures) run with the same
    thread count as the tests: a bf16 matmul split over another number of threads sums in another
    order, and a resumed run compared with a fixture's run then differs in the 4th digit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def meta_tokenizer_path() -> Path:
    if not META_TOKENIZER.is_file():
        pytest.skip(f"Meta's Llama 2 tokenizer is not present at {META_TOKENIZER}")
    return META_TOKENIZER
