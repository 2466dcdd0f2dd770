"""Compare local runs: ``llama2-lit runs DIR [DIR ...] [--metric NAME ...] [--plot out.png]``.

A run directory (``runs/<stage>-<size>/``, written by ``llama2-lit fit``) holds ``run.json``
(name, stage, size, W&B id) and ``metrics.csv`` (``step,metric,value,time``, one row per logged
value; see ``llama2_lit.stages.loggers``). W&B compares runs online; offline (the default here) it
keeps no summary to read back, so this reads the CSV files: a table of the last value of each
metric per run, and curves of the chosen metrics against the step, one panel per metric, one line
per run. ``load_runs``/``runs_table``/``plot_runs`` do the same in a notebook.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("step", "metric", "value", "time")
RUN_INFO_FILE = "run.json"
DEFAULT_METRICS = ("train/loss", "val/loss", "val/ppl", "val/helpfulness", "perf/tokens_per_s", "perf/mfu")


@dataclass
class Run:
    """The metrics of one run: ``series[metric]`` is a list of (step, value), by step."""

    path: Path
    name: str
    info: dict[str, Any]
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def last(self, metric: str) -> float | None:
        points = self.series.get(metric)
        return points[-1][1] if points else None

    def best(self, metric: str, *, mode: str = "min") -> float | None:
        points = self.series.get(metric)
        if not points:
            return None
        values = [value for _, value in points if math.isfinite(value)]
        return (min if mode == "min" else max)(values) if values else None


def load_run(path: str | Path) -> Run:
    """Read one run directory (or a ``metrics.csv`` file directly)."""
    path = Path(path)
    csv_path = path if path.is_file() else path / METRICS_FILE
    run_dir = csv_path.parent
    if not csv_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (is it a run directory written by `llama2-lit fit`?)")
    info_path = run_dir / RUN_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    series: dict[str, dict[int, float]] = {}
    times: list[float] = []
    with csv_path.open(newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or not set(METRICS_COLUMNS[:3]) <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: expected columns {list(METRICS_COLUMNS)}, found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                step, value = int(row["step"]), float(row["value"])
            except (TypeError, ValueError):
                raise ValueError(f"{csv_path}, line {line}: bad step/value {row['step']!r}/{row['value']!r}") from None
            # A later row for the same step wins (e.g. a value logged again after a resume).
            series.setdefault(row["metric"], {})[step] = value
            if row.get("time"):
                times.append(float(row["time"]))
    run = Run(path=run_dir, name=info.get("name", run_dir.name), info=info,
              series={metric: sorted(points.items()) for metric, points in series.items()})
    run.wall_seconds = (max(times) - min(times)) if times else 0.0
    return run


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    return [load_run(path) for path in paths]


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"


def runs_table(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per run; its last step, wall time and last value per metric."""
    if metrics is None:
        present = {metric for run in runs for metric in run.series}
        metrics = [metric for metric in DEFAULT_METRICS if metric in present]
    header = ["run", "stage", "size", "steps", "wall"] + list(metrics)
    rows = []
    for run in runs:
        last_step = max((points[-1][0] for points in run.series.values() if points), default=0)
        rows.append([run.name, str(run.info.get("stage", "-")), str(run.info.get("size", "-")), str(last_step),
                     f"{run.wall_seconds / 60:.1f}m"] + [_format(run.last(metric)) for metric in metrics])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def plot_runs(runs: Sequence[Run], metrics: Sequence[str], out: str | Path | None = None, *,
              log_y: Sequence[str] = ("val/ppl",)) -> Any:
    """One panel per metric, one line per run, against the training step. Returns the figure."""
    import matplotlib

    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for run in runs:
            points = run.series.get(metric)
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=run.name)
        axis.set_title(metric)
        axis.set_xlabel("step")
        if metric in log_y:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=120)
        plt.close(figure)
    return figure
