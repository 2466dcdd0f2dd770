"""``llama2-lit runs``: compare local runs."""

from __future__ import annotations

from pathlib import Path

from llama2_lit.cli.common import CommandError, new_parser


def runs_main(argv: list[str] | None = None) -> int:
    """Tabulate and plot the metrics of local runs (their metrics.csv files).

    A table of the last value of each metric per run and, with --plot, curves of the chosen metrics
    against the step, one panel per metric, one line per run (llama2_lit.runs).
    """
    from llama2_lit.runs import DEFAULT_METRICS

    parser = new_parser("runs", runs_main.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories (runs/<stage>-<size>) or metrics.csv files")
    parser.add_argument("--metric", action="append", dest="metrics",
                        help=f"metric to show (repeatable); default: those of {list(DEFAULT_METRICS)} present")
    parser.add_argument("--plot", type=Path, help="also plot the metrics against the step into this image file")
    args = parser.parse_args(argv)

    from llama2_lit.runs import load_runs, plot_runs, runs_table

    runs = load_runs(args.dirs)
    metrics = args.metrics
    print(runs_table(runs, metrics))
    if args.plot is not None:
        if metrics is None:
            present = {metric for run in runs for metric in run.series}
            metrics = [metric for metric in DEFAULT_METRICS if metric in present]
        if not metrics:
            raise CommandError("no metrics to plot; name them with --metric")
        plot_runs(runs, metrics, args.plot)
        print(f"plot: {args.plot}")
    return 0
