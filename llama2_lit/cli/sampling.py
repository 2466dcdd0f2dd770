"""``llama2-lit sample``: rejection sampling from the command line (``llama2_lit.sampling.rejection``)."""

from __future__ import annotations

import json
from pathlib import Path

from llama2_lit.cli.common import CommandError, new_parser


def sample_main(argv: list[str] | None = None) -> int:
    """Rejection sampling (paper 3.2.3): best-of-K samples scored by the reward models, pooled across
    iterations.

    Without --finetune-config: one sampling pass (--temperature required) through Trainer.predict on
    --devices (under --strategy ddp every rank runs this command and rank 0 writes
    OUT/iteration-<i>/{samples,best,train}.jsonl and OUT/pool.jsonl). With it: --iterations full
    iterations on one process, each with a temperature sweep (unless --temperature), fine-tuning and
    the oracle's evaluation on --eval-prompts (run_rejection_sampling).
    """
    from llama2_lit.data.records import load_records, write_jsonl, write_records
    from llama2_lit.sampling.rejection import (DEFAULT_TEMPERATURES, RewardModels, best_records, checkpoint_tokenizer,
                                               pool_training_set, predict_rejection_samples, run_rejection_sampling,
                                               sample_rows, update_pool)
    from llama2_lit.tokenizer import Tokenizer

    parser = new_parser("sample", sample_main.__doc__)
    parser.add_argument("policy", type=Path, help="the policy checkpoint (a stage .ckpt or a model folder)")
    parser.add_argument("--rm-helpfulness", type=Path, required=True, help="helpfulness reward model checkpoint")
    parser.add_argument("--rm-safety", type=Path, required=True, help="safety reward model checkpoint")
    parser.add_argument("--prompts", type=Path, required=True, help="`prompts` records (JSONL)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (pool.jsonl, iteration-<i>/)")
    parser.add_argument("--num-samples", "-k", type=int, default=16, help="K samples per prompt")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: a sweep)")
    parser.add_argument("--temperatures", default=",".join(map(str, DEFAULT_TEMPERATURES)), help="the sweep's grid")
    parser.add_argument("--sweep-prompts", type=int, default=48, help="prompts of each sweep")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: all)")
    parser.add_argument("--iteration", type=int, default=1, help="this pass's iteration number (sampling pass)")
    parser.add_argument("--iterations", type=int, default=2, help="iterations (with --finetune-config)")
    parser.add_argument("--finetune-config", type=Path, default=None,
                        help="configs/<size>/rejection_sampling.yaml: run the whole loop")
    parser.add_argument("--eval-prompts", type=Path, default=None, help="held-out `prompts` records for the oracle")
    parser.add_argument("--eval-num", type=int, default=100, help="held-out prompts evaluated")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest response")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1.0: the temperature is the one knob)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--keep-unfinished", action="store_true",
                        help="samples cut at --max-new-tokens may be kept too (default: only those that ended)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the one the policy records")
    parser.add_argument("--accelerator", default="auto", help="sampling pass: Lightning's accelerator")
    parser.add_argument("--devices", default="1", help="sampling pass: devices")
    parser.add_argument("--strategy", default="auto", help="sampling pass: Lightning's strategy (e.g. ddp)")
    args = parser.parse_args(argv)
    try:
        temperatures = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        raise CommandError(f"--temperatures {args.temperatures!r}: expected numbers separated by commas") from None
    if args.finetune_config is not None:
        report = run_rejection_sampling(
            args.policy, args.rm_helpfulness, args.rm_safety, args.prompts, args.out, iterations=args.iterations,
            finetune_config=args.finetune_config, num_samples=args.num_samples, temperature=args.temperature,
            temperatures=temperatures, sweep_prompts=args.sweep_prompts, num_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed,
            eval_prompts_file=args.eval_prompts, eval_prompts=args.eval_num, tokenizer_path=args.tokenizer,
            require_eos=not args.keep_unfinished)
        print(json.dumps({"temperature_optimum": report["temperature_optimum"],
                          "evaluation": [r.get("evaluation", {}).get("gaps") for r in report["iterations"]]},
                         indent=2))
        return 0
    if args.temperature is None:
        raise CommandError("a sampling pass needs --temperature (or --finetune-config to sweep and run the loop)")
    tokenizer_path = checkpoint_tokenizer(args.policy, args.tokenizer)
    prompts = load_records(args.prompts, "prompts")[:args.num_prompts]
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    samples = predict_rejection_samples(
        args.policy, args.rm_helpfulness, args.rm_safety, prompts, tokenizer_path=tokenizer_path,
        trainer_options={"accelerator": args.accelerator, "devices": devices, "strategy": args.strategy},
        num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, iteration=args.iteration, with_oracle=False,
        require_eos=not args.keep_unfinished)
    if not samples:  # not rank 0: rank 0 writes
        return 0
    step_dir = args.out / f"iteration-{args.iteration}"
    best = best_records(samples, iteration=args.iteration, temperature=args.temperature)
    write_jsonl(sample_rows(samples), step_dir / "samples.jsonl")
    if not best:
        raise CommandError(f"no prompt has an eligible sample (every response empty, cut at --max-new-tokens "
                           f"{args.max_new_tokens} or holding a chat tag; see {step_dir / 'samples.jsonl'}; "
                           "--keep-unfinished keeps cut ones)")
    write_records(best, step_dir / "best.jsonl", "chat")
    pool_path = args.out / "pool.jsonl"
    pool = update_pool(load_records(pool_path, "chat") if pool_path.is_file() else [], best)
    write_records(pool, pool_path, "chat")
    scorer = RewardModels.from_checkpoints(args.rm_helpfulness, args.rm_safety, Tokenizer(tokenizer_path))
    train = pool_training_set(pool, scorer, iteration=args.iteration)
    write_records(train, step_dir / "train.jsonl", "chat")
    print(f"{len(samples)} prompts x {args.num_samples} samples at T={args.temperature}: kept {len(best)} "
          f"-> {step_dir / 'best.jsonl'}; pool {len(pool)} -> {pool_path}; fine-tuning set {len(train)} "
          f"-> {step_dir / 'train.jsonl'}")
    return 0


def _run_data_stage(stage, args, **params) -> dict:
    """One of the pipeline's data stages (``gatt_data_stage``, ``context_distillation_stage``) on
    ``args.checkpoint``, writing OUT/train.jsonl and OUT/summary.json (atomically)."""
    from llama2_lit.cli.common import resolve_tokenizer

    tokenizer = resolve_tokenizer(args.checkpoint, args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = stage(args.out, policy=str(args.checkpoint), max_new_tokens=args.max_new_tokens,
                    tokenizer=str(tokenizer), **params)
    partial = args.out / "summary.json.partial"
    partial.write_text(json.dumps(summary, indent=1, default=str))
    partial.replace(args.out / "summary.json")
    return summary


def gatt_main(argv: list[str] | None = None) -> int:
    """Ghost Attention data (paper 3.3): each dialog's answers sampled turn by turn from the latest RLHF
    model with the instruction concatenated to every user turn, written as training dialogs that keep
    it in the first turn only, with the loss on the last answer. Then fine-tune on OUT/train.jsonl:
    `llama2-lit fit --config configs/micro/gatt.yaml --data.init_args.train_files '[OUT/train.jsonl]'`."""
    parser = new_parser("gatt", gatt_main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="the model that samples the answers (a stage .ckpt or a model folder)")
    parser.add_argument("--dialogs", type=Path, required=True,
                        help="multi-turn chat records whose meta names their constraints (the toy world's gatt_train.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl (chat records) and summary.json")
    parser.add_argument("--num-dialogs", type=int, default=None, help="the first N dialogs (default: all)")
    parser.add_argument("--keep-all", action="store_true",
                        help="also keep dialogs whose sampled answers miss a constraint (default: drop them)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer per turn")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the one the checkpoint records")
    args = parser.parse_args(argv)

    from llama2_lit.pipeline import gatt_data_stage

    summary = _run_data_stage(gatt_data_stage, args, dialogs=str(args.dialogs), num_dialogs=args.num_dialogs,
                              require_adherence=not args.keep_all)
    print(f"wrote {args.out / 'train.jsonl'}: {summary.get('kept')} of {summary.get('dialogs')} dialogs kept")
    return 0


def distill_main(argv: list[str] | None = None) -> int:
    """Safety context distillation data (paper 4.2.4): answers to the harmful prompts sampled with and
    without a safety preprompt; the prompt without the preprompt and the distilled answer are kept
    where the safety RM scores the distilled answer higher (Fig 16b). Then fine-tune on OUT/train.jsonl
    (`configs/micro/context_distillation.yaml`)."""
    parser = new_parser("distill", distill_main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="the model that answers (a stage .ckpt or a model folder)")
    parser.add_argument("--safety-rm", type=Path, required=True, help="the safety reward model that filters")
    parser.add_argument("--prompts", type=Path, required=True,
                        help="prompt records; those marked is_safety are used (the toy world's rl_prompts_train.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl (chat records) and summary.json")
    parser.add_argument("--num-prompts", type=int, default=None, help="the first N safety prompts (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the one the checkpoint records")
    args = parser.parse_args(argv)

    from llama2_lit.pipeline import context_distillation_stage

    summary = _run_data_stage(context_distillation_stage, args, safety_rm=str(args.safety_rm),
                              prompts=str(args.prompts), num_prompts=args.num_prompts)
    print(f"wrote {args.out / 'train.jsonl'}: {summary.get('kept')} of {summary.get('prompts')} distilled answers kept")
    return 0
