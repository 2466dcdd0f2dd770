"""``llama2-lit annotate`` and ``llama2-lit reward score``: preference data from a policy, and the
scores of a reward model (paper sections 3.2.1 and 3.2.2)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from llama2_lit.cli.common import new_parser, resolve_tokenizer


def annotate_main(argv: list[str] | None = None) -> int:
    """Sample two responses per prompt from the policy (two temperatures, or two checkpoints), let the
    toy world's oracle annotate them like the static preference pairs, and write preference records
    (paper section 3.2.1)."""
    parser = new_parser("annotate", annotate_main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="the policy (a stage .ckpt or a model folder)")
    parser.add_argument("--prompts", type=Path, required=True, help="prompts records (with the oracle's meta)")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl of preference records (atomic)")
    parser.add_argument("--second", type=Path, default=None,
                        help="a second checkpoint for the other response (default: the same policy)")
    parser.add_argument("--temperatures", type=float, nargs=2, default=(0.6, 1.0), metavar=("T1", "T2"),
                        help="sampling temperature of each response")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest response")
    parser.add_argument("--limit", type=int, default=None, help="annotate only the first N prompts")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts sampled together")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--no-safety-mix", action="store_true", help="keep every safety pair (no 18/47/35 subsampling)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the one the checkpoint records")
    args = parser.parse_args(argv)

    from llama2_lit.checkpoints import load_model
    from llama2_lit.data.records import load_records, write_records
    from llama2_lit.sampling.annotate import Sampler, annotate_on_policy
    from llama2_lit.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_tokenizer(args.checkpoint, args.tokenizer))
    prompts = load_records(args.prompts, "prompts")[: args.limit]
    policy = load_model(args.checkpoint)
    other = load_model(args.second) if args.second is not None else policy
    first = Sampler(policy, args.temperatures[0], args.checkpoint.stem if args.second else "policy")
    second = Sampler(other, args.temperatures[1], args.second.stem if args.second else "policy")
    records, stats = annotate_on_policy(prompts, tokenizer, first, second, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, top_p=args.top_p, seed=args.seed,
                                        safety_mix=not args.no_safety_mix)
    write_records(records, args.out, "preference")
    print(f"wrote {stats.pairs} preference records to {args.out}: {asdict(stats)}")
    return 0


def reward_main(argv: list[str] | None = None) -> int:
    """Reward-model tools.

    llama2-lit reward score CKPT --data FILE [--out FILE]    sigmoid-scale scores as JSON lines
    """
    parser = new_parser("reward", reward_main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser(
        "score", help="score records with a reward model", formatter_class=parser.formatter_class,
        description="One JSON line per record: for a preference record the scores of its chosen and rejected "
                    "responses, for a chat record the score of its final assistant turn; on the sigmoid scale, "
                    "as the paper reports reward-model scores (section 3.2.2).")
    score.add_argument("checkpoint", type=Path, help="a reward model (stage .ckpt or folder with a scalar head)")
    score.add_argument("--data", type=Path, required=True, help="preference or chat records")
    score.add_argument("--kind", choices=("auto", "preference", "chat"), default="auto",
                       help="record kind (auto: preference when the first line has 'chosen')")
    score.add_argument("--out", type=Path, default=None, help="output .jsonl (atomic; default: stdout)")
    score.add_argument("--tokenizer", type=Path, default=None, help="default: the one the checkpoint records")
    score.add_argument("--batch-size", type=int, default=32, help="records scored together")
    args = parser.parse_args(argv)

    import torch

    from llama2_lit.data.records import load_records, write_jsonl
    from llama2_lit.reward_metrics import load_reward_model, score_pairs, score_responses
    from llama2_lit.tokenizer import Tokenizer

    kind = args.kind
    if kind == "auto":
        first = next((line for line in args.data.open(encoding="utf-8") if line.strip()), "{}")
        try:
            kind = "preference" if "chosen" in json.loads(first) else "chat"
        except json.JSONDecodeError as error:
            raise ValueError(f"{args.data}, line 1: invalid JSON ({error.msg}); pass --kind") from None
    records = load_records(args.data, kind)
    tokenizer = Tokenizer(resolve_tokenizer(args.checkpoint, args.tokenizer))
    model = load_reward_model(args.checkpoint)
    if kind == "preference":
        r_chosen, r_rejected = score_pairs(model, tokenizer, records, batch_size=args.batch_size)
        rows = [{"index": i, "chosen": round(float(c), 6), "rejected": round(float(r), 6)}
                for i, (c, r) in enumerate(zip(torch.sigmoid(r_chosen), torch.sigmoid(r_rejected)))]
    else:
        if any(r["messages"][-1]["role"] != "assistant" for r in records):
            raise ValueError(f"{args.data}: every chat record must end with the assistant turn to score")
        scores = score_responses(model, tokenizer, [r["messages"][:-1] for r in records],
                                 [r["messages"][-1]["content"] for r in records], batch_size=args.batch_size)
        rows = [{"index": i, "score": round(float(s), 6)} for i, s in enumerate(torch.sigmoid(scores))]
    if args.out is not None:
        write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} scores to {args.out}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row))
    return 0
