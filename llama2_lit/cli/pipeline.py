"""``llama2-lit demo``: the recipe end to end on the toy world (``make demo``)."""

from __future__ import annotations

import shlex

from llama2_lit.cli.common import new_parser


def demo_main(argv: list[str] | None = None) -> int:
    """The recipe end to end on the toy world: each stage trained from its YAML config with
    `llama2-lit fit`, then the oracle's evaluation and OUT/report.md (llama2_lit.pipeline).

    Finished stages are kept (OUT/<stage>/DONE.json) and an interrupted one resumes; --fresh starts over.
    """
    from llama2_lit.pipeline import STAGES

    parser = new_parser("demo", demo_main.__doc__)
    parser.add_argument("--size", default="micro", help="configs/<size>/ to use (micro: the demo; nano: seconds)")
    parser.add_argument("--out", default="runs/demo", help="where the runs and the report go")
    parser.add_argument("--fresh", action="store_true", help="delete --out first and train everything again")
    parser.add_argument("--eval-prompts", type=int, default=100, help="prompts per evaluation suite")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in the evaluation")
    for stage in STAGES:
        parser.add_argument(f"--{stage}-args", default="",
                            help=f"extra `llama2-lit fit` arguments for {stage}, e.g. '--trainer.max_steps 50'")
    args = parser.parse_args(argv)

    from llama2_lit.pipeline import run_pipeline

    stage_args = {stage: shlex.split(getattr(args, f"{stage.replace('-', '_')}_args")) for stage in STAGES}
    report = run_pipeline(args.size, args.out, fresh=args.fresh, eval_prompts=args.eval_prompts,
                          max_new_tokens=args.max_new_tokens, stage_args=stage_args)
    print(f"\nreport: {report}\n")
    print(report.read_text())
    return 0
