"""``llama2-lit data`` and ``llama2-lit world``: record files and the toy world."""

from __future__ import annotations

import json
import sys
import time

from llama2_lit.cli.common import CommandError, new_parser


def data_main(argv: list[str] | None = None) -> int:
    """Validate and convert record files.

    llama2-lit data validate FILE --kind KIND      every problem of a file, one line each (exit 1 if any)
    llama2-lit data convert SRC DST --kind KIND    adapt (HH-RLHF, Alpaca), validate, write JSONL atomically
                                                   (exit 2 and nothing written if any record is bad)
    """
    from llama2_lit.data.records import KINDS, SOURCE_FORMATS

    parser = new_parser("data", data_main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="report every problem of a file (exit 1 if any)",
                                   formatter_class=parser.formatter_class)
    validate.add_argument("source", help="a .jsonl/.json/.parquet/.txt file or a hub dataset id")
    convert = commands.add_parser("convert", help="adapt (HH-RLHF, Alpaca) and validate, then write JSONL atomically",
                                  formatter_class=parser.formatter_class)
    convert.add_argument("source", help="a .jsonl/.json/.parquet/.txt file or a hub dataset id")
    convert.add_argument("destination", help="output .jsonl")
    for command in (validate, convert):
        command.add_argument("--kind", required=True, choices=KINDS, help="what the records are")
        command.add_argument("--from", dest="source_format", default="auto", choices=SOURCE_FORMATS,
                             help="the source's own format, adapted on reading")
        command.add_argument("--max-chars", type=int, default=None, help="longest allowed example, in characters")
        command.add_argument("--split", default=None, help="split of a hub dataset (default train)")
    args = parser.parse_args(argv)

    from llama2_lit.data.records import RecordError, check_records, write_jsonl

    try:
        records, problems = check_records(args.source, args.kind, split=args.split, max_chars=args.max_chars,
                                          source_format=args.source_format)
    except RecordError as error:
        records, problems = [], error.problems
    for problem in problems:  # one line each: file, line, field
        print(problem, file=sys.stderr)
    if problems:
        summary = f"{args.source}: {len(problems)} problem(s); {len(records)} valid {args.kind} record(s)"
        if args.command == "convert":  # a failure: nothing is written
            raise CommandError(f"{summary}; nothing written to {args.destination}")
        print(summary, file=sys.stderr)  # validate's answer, not a failure of the command
        return 1
    if args.command == "convert":
        write_jsonl(records, args.destination)
        print(f"wrote {len(records)} {args.kind} records to {args.destination}")
    else:
        print(f"{args.source}: OK, {len(records)} {args.kind} record(s)")
    return 0


def world_main(argv: list[str] | None = None) -> int:
    """Generate the toy world's data files (or, with --check, verify them against their manifest).

    `llama2-lit world check CKPT` measures the RLHF stages' preconditions on a checkpoint instead
    (llama2_lit.world_check): constraint adherence by turn, violations by attack vector, false
    refusals, best-of-K headroom and task accuracy.
    """
    from llama2_lit.data.world import SIZES

    argv = list(argv or [])
    if argv[:1] == ["check"]:
        return world_check_main(argv[1:])

    parser = new_parser("world", world_main.__doc__)
    parser.add_argument("--out", default="data/world", help="output folder (replaced if it holds a previous world)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--size", default="default", choices=sorted(SIZES), help="how many records of each kind")
    parser.add_argument("--check", action="store_true", help="only verify the folder's checksums against its manifest")
    args = parser.parse_args(argv)

    from llama2_lit.data.world import WORLD_VERSION, generate_world, verify_world

    if args.check:
        problems = verify_world(args.out)
        for problem in problems:
            print(problem)
        print("OK" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    start = time.perf_counter()
    out = generate_world(args.out, seed=args.seed, size=args.size)
    elapsed = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    width = max(map(len, manifest["files"]))
    print(f"toy world v{WORLD_VERSION}, seed {args.seed}, size {args.size}: {out} ({elapsed:.1f} s)")
    for name, info in manifest["files"].items():
        print(f"  {name:<{width}}  {info['kind']:<10} {info['records']:>7} records {info['words']:>9} words "
              f"{info['bytes'] / 1e6:7.2f} MB")
    return 0


def world_check_main(argv: list[str] | None = None) -> int:
    """Measure the RLHF stages' preconditions on a checkpoint (llama2_lit.world_check): constraint
    adherence by type and turn, violations by attack vector, false refusals on borderline prompts,
    oracle best-of-K headroom, held-out and seen task accuracy."""
    from pathlib import Path

    parser = new_parser("world check", world_check_main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint (.ckpt of llama2-lit fit, or any layout load_model reads)")
    parser.add_argument("--world", default="data/world", help="the generated world folder")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece model (default: the one the checkpoint records, or tokenizer.model in its folder)")
    parser.add_argument("--gatt", type=int, default=96, help="multi-turn constrained dialogs (0 = all)")
    parser.add_argument("--safety", type=int, default=0, help="harmful prompts (0 = all of safety_eval)")
    parser.add_argument("--borderline", type=int, default=0, help="borderline prompts (0 = all)")
    parser.add_argument("--best-of-prompts", type=int, default=48, help="prompts for the best-of-K headroom")
    parser.add_argument("--tasks", type=int, default=100, help="task prompts per split")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draws and the samples")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).exists():
        raise CommandError(f"checkpoint {args.checkpoint} does not exist")
    if not (Path(args.world) / "manifest.json").is_file():
        raise CommandError(f"{args.world} is not a generated world (no manifest.json); run `llama2-lit world` first")

    from llama2_lit.cli.common import resolve_tokenizer
    from llama2_lit.checkpoints import load_model
    from llama2_lit.tokenizer import Tokenizer
    from llama2_lit.world_check import format_world_check, world_check

    tokenizer = Tokenizer(resolve_tokenizer(Path(args.checkpoint), None if args.tokenizer is None else Path(args.tokenizer)))
    model = load_model(args.checkpoint).eval()
    result = world_check(model, tokenizer, args.world, n_gatt=args.gatt or None, n_safety=args.safety or None,
                         n_borderline=args.borderline or None, n_best_of=args.best_of_prompts, n_tasks=args.tasks,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    print(format_world_check(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
