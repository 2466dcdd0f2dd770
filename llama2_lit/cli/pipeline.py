"""``llama2-lit demo`` (= ``llama2-lit pipeline``): the recipe end to end on the toy world (``make demo``)."""

from __future__ import annotations

import dataclasses

from llama2_lit.cli.common import new_parser


def demo_main(argv: list[str] | None = None) -> int:
    """The recipe end to end on the toy world, as a graph of stages (llama2_lit.pipeline): world,
    pretraining, SFT, RLHF versions (fresh on-policy pairs, both reward models retrained; PPO in the
    last), Ghost Attention, safety context distillation, the evaluation suite and OUT/report.md
    (+ report.html and plots).

    Finished stages are kept (OUT/<stage>/DONE.json) and skipped while their config, overrides and
    inputs are unchanged; an interrupted training stage resumes from its last checkpoint.
    --force STAGE reruns a stage (or every stage with that tag: rm, annotate, ppo, gatt, cd, v1, ...)
    and everything downstream of it; --fresh starts over.
    """
    from llama2_lit.pipeline import BUDGETS, Budget, plan, recipe, run_pipeline

    parser = new_parser("demo", demo_main.__doc__)
    parser.add_argument("--size", default="micro", help="configs/<size>/ to use (micro: the demo; nano: CI, ~3 min)")
    parser.add_argument("--out", default="runs/demo", help="where the runs and the report go")
    parser.add_argument("--versions", type=int, default=2, help="RLHF versions (the last one runs PPO)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="rerun this stage (name or tag) and everything downstream; repeatable")
    parser.add_argument("--fresh", action="store_true", help="delete --out first and run everything again")
    parser.add_argument("--plan", action="store_true", help="show the stages and what each would do; run nothing")
    parser.add_argument("--group", default=None, help="W&B group of the pipeline's runs (default: demo-<size>-<out>)")
    parser.add_argument("--eval-prompts", type=int, default=None,
                        help="prompts per evaluation suite (default: the size's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest sampled answer (default: the size's)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the training stages in this process instead of one `llama2-lit fit` subprocess "
                             "each (saves the start-up of every stage; the tests use it)")
    args = parser.parse_args(argv)

    budget = BUDGETS.get(args.size, Budget())
    changes = {k: v for k, v in (("eval_prompts", args.eval_prompts), ("max_new_tokens", args.max_new_tokens))
               if v is not None}
    budget = dataclasses.replace(budget, **changes)
    if args.plan:
        from pathlib import Path

        stages = recipe(args.size, args.versions, budget)
        for name, status in plan(stages, Path(args.out), args.force).items():
            stage = next(s for s in stages if s.name == name)
            print(f"{name:<22} {status:<7} <- {', '.join(stage.inputs) or '-'}")
        return 0
    report = run_pipeline(args.size, args.out, versions=args.versions, fresh=args.fresh, force=args.force,
                          budget=budget, group=args.group, in_process=args.in_process)
    print(f"\nreport: {report} (and {report.with_suffix('.html')})")
    return 0
