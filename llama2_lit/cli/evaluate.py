"""``llama2-lit evaluate CKPT [CKPT ...]``: the evaluation suite (llama2_lit.evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

from llama2_lit.cli.common import CommandError, new_parser


def evaluate_main(argv: list[str] | None = None) -> int:
    """The evaluation suite on one or more policy checkpoints, judged by the toy world's oracle:
    perplexity on held-out text; helpfulness and accuracy on held-out tasks; the violation rate on
    harmful prompts; the false-refusal rate on borderline prompts; with two or more checkpoints,
    the win rate (win / tie / loss) of each against the first, by the oracle and, given reward
    models, by the safety-aware reward; given reward models, their accuracy by rating (Table 8)
    on the held-out preference pairs.

    Decoding defaults to the paper's automatic safety evaluation (section 4.1): temperature 0.1,
    top-p 0.9. Writes JSON (--out) and prints a markdown table (also --markdown FILE).

    Checkpoints are named by their path, or NAME=PATH.
    """
    from llama2_lit.evaluation import Decoding, evaluate_checkpoints, results_markdown

    parser = new_parser("evaluate", evaluate_main.__doc__)
    parser.add_argument("checkpoints", nargs="+",
                        help="policy checkpoints (PATH or NAME=PATH); the first is the baseline")
    parser.add_argument("--world", type=Path, default=Path("data/world"), help="the toy world's files")
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer/toy-4096.model"))
    parser.add_argument("--prompts", type=int, default=100, help="prompts per suite")
    parser.add_argument("--temperature", type=float, default=Decoding.temperature, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=Decoding.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=Decoding.max_new_tokens)
    parser.add_argument("--seed", type=int, default=0, help="the suites' prompts and the sampling seeds")
    parser.add_argument("--helpfulness-rm", type=Path, default=None, help="helpfulness reward model")
    parser.add_argument("--safety-rm", type=Path, default=None, help="safety reward model")
    parser.add_argument("--pairs", action="append", default=[], metavar="NAME=FILE",
                        help="preference records to test the reward models on (repeatable; default: the world's "
                             "held-out helpfulness and safety pairs)")
    parser.add_argument("--out", type=Path, default=None, help="results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="the tables as markdown")
    args = parser.parse_args(argv)

    checkpoints: dict[str, str] = {}
    for item in args.checkpoints:
        name, _, path = item.partition("=") if "=" in item else (item, "", item)
        if not Path(path).exists():
            raise CommandError(f"checkpoint {path} does not exist")
        if name in checkpoints:
            raise CommandError(f"two checkpoints are named {name!r}; name them NAME=PATH")
        checkpoints[name] = path
    reward_models = {kind: str(path) for kind, path in (("helpfulness", args.helpfulness_rm),
                                                          ("safety", args.safety_rm)) if path is not None}
    pairs = {}
    for item in args.pairs:
        name, sep, path = item.partition("=")
        if not sep:
            raise CommandError(f"--pairs {item}: expected NAME=FILE")
        pairs[name] = path
    if reward_models and not pairs:
        pairs = {"helpfulness (held-out)": str(args.world / "preference_helpful_eval.jsonl"),
                 "safety (held-out)": str(args.world / "preference_safety_eval.jsonl")}
    decoding = Decoding(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        seed=args.seed)
    results = evaluate_checkpoints(checkpoints, world=args.world, tokenizer_path=args.tokenizer,
                                   prompts_per_suite=args.prompts, decoding=decoding, reward_models=reward_models,
                                   preference_files=pairs, log=lambda line: print(line, flush=True))
    table = results_markdown(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.replace(args.out)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table)
    return 0
