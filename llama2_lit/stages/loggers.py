"""The run's own metrics file: a long CSV (``step,metric,value,time``) in the run directory.

W&B runs offline here (no account, no network) and an offline run has no summary file to read
back, so every run also writes its metrics where ``llama2-lit runs`` and the notebooks read them.
Long format (one row per value) means appending never rewrites a header when a new metric
appears, and resuming is a matter of dropping the rows after the checkpoint's step: the steps
the interrupted run logged after its last checkpoint are trained again, and logged again, by the
resumed run.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from llama2_lit.runs import METRICS_COLUMNS, METRICS_FILE


class RunCSVLogger(Logger):
    """Appends ``step,metric,value,time`` rows to ``<run_dir>/metrics.csv`` (rank 0 only).

    Args:
        run_dir: the run directory.
        resume_step: the global step of the checkpoint being resumed (the number of optimizer
            steps it contains); rows of later steps are dropped before the first new row. None: a
            fresh run, any old file is replaced.
        filename: the file's name in ``run_dir``.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None, filename: str = METRICS_FILE) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.resume_step = resume_step
        self._opened = False

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return self.run_dir.name

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @property
    @rank_zero_experiment
    def experiment(self) -> Path:
        return self.path

    def _open(self) -> None:
        """Start the file (fresh run) or cut it back to the resumed step (resumed run)."""
        self._opened = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if self.resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as file:
                # Row step s was logged by training step s (0-based), which a checkpoint at global
                # step k contains when s < k; later rows are about to be logged again.
                kept = [row for row in csv.DictReader(file) if int(row["step"]) < self.resume_step]
        partial = self.path.with_name(self.path.name + ".partial")
        with partial.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        partial.replace(self.path)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._opened:
            self._open()
        now = f"{time.time():.3f}"
        with self.path.open("a", newline="") as file:
            writer = csv.writer(file)
            for metric, value in metrics.items():
                if metric == "epoch":
                    continue  # Lightning adds it to every call; the step is the x-axis
                writer.writerow([step if step is not None else -1, metric, repr(float(value)), now])

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the run directory has config.yaml (the full CLI config) and W&B has them all
