"""The set-up every course notebook starts with, in one place.

``setup()`` seeds Python, NumPy and torch, sets the thread count, optionally moves to the
repository root (the configs name paths relative to it), and prints what a reader needs to
reproduce the outputs below it: the versions of Python, torch and Lightning, the seed, the thread
count and the scale.

The scale: notebooks run small by default (``ci``: what the test suite executes, in seconds to a
couple of minutes on a CPU); ``LLAMA2_LIT_NOTEBOOK_SCALE=full`` (``make notebooks``) runs them at
the size a reader should see. A notebook's parameter cell says both with ``pick(ci=..., full=...)``.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

SCALE_VARIABLE = "LLAMA2_LIT_NOTEBOOK_SCALE"
SCALES = ("ci", "full")

T = TypeVar("T")


def scale() -> str:
    """``ci`` (the default) or ``full``, from ``$LLAMA2_LIT_NOTEBOOK_SCALE``."""
    value = os.environ.get(SCALE_VARIABLE, "ci").strip().lower() or "ci"
    if value not in SCALES:
        raise ValueError(f"${SCALE_VARIABLE}={value!r}; choose one of {SCALES}")
    return value


def pick(*, ci: T, full: T) -> T:
    """The value of a parameter at the current scale."""
    return full if scale() == "full" else ci


def repo_root(start: Path | None = None) -> Path:
    """The repository root above ``start`` (default: the working directory): where ``pyproject.toml`` is."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "llama2_lit").is_dir():
            return folder
    raise FileNotFoundError(f"no llama2_lit checkout above {start} (run the notebook from the repository)")


@dataclass(frozen=True)
class NotebookSetup:
    """What ``setup`` did."""

    seed: int
    threads: int
    scale: str
    root: Path | None


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def setup(seed: int = 0, *, threads: int | None = None, at_repo_root: bool = False) -> NotebookSetup:
    """Seed everything, set the threads (None: torch's default), maybe ``chdir`` to the repository
    root, and print the versions, the seed, the thread count and the scale."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    root = None
    if at_repo_root:
        root = repo_root()
        os.chdir(root)
    done = NotebookSetup(seed=seed, threads=torch.get_num_threads(), scale=scale(), root=root)
    print(f"Python {platform.python_version()} | torch {torch.__version__} | Lightning {_version('lightning')} | "
          f"seed {done.seed} | {done.threads} thread{'s' * (done.threads != 1)} | scale {done.scale}"
          f" (${SCALE_VARIABLE})")
    return done
