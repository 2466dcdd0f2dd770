"""``llama2-lit tokenizer train`` and ``llama2-lit tokenize``: make a tokenizer, look through one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llama2_lit.cli.common import CommandError, new_parser


def tokenizer_main(argv: list[str] | None = None) -> int:
    """SentencePiece tokenizers with Llama 2's settings (paper section 2.2: BPE, digits split, bytes
    as fallback).

    llama2-lit tokenizer train (--input FILE [FILE ...] | --dataset PATH --column NAME)
        --vocab-size N --out PATH.model
    """
    from llama2_lit.tokenizer import DEFAULT_NUM_THREADS

    parser = new_parser("tokenizer", tokenizer_main.__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train", help="train a BPE tokenizer with Llama 2's settings",
                             formatter_class=parser.formatter_class)
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files, one sentence per line")
    source.add_argument("--dataset", metavar="PATH",
                        help="a dataset file/folder (json, jsonl, parquet, csv, save_to_disk) or hub id")
    train.add_argument("--column", help="text column of --dataset")
    train.add_argument("--split", default="train", help="split of --dataset")
    train.add_argument("--vocab-size", type=int, required=True, help="e.g. 4096 for the course models, 32000 for Meta's")
    train.add_argument("--out", type=Path, required=True, metavar="PATH.model")
    train.add_argument("--num-threads", type=int, default=DEFAULT_NUM_THREADS,
                       help="recorded in the file; does not change the pieces")
    args = parser.parse_args(argv)
    if args.dataset is not None and not args.column:
        parser.error("--dataset needs --column")

    from llama2_lit.tokenizer import Tokenizer, dataset_column_texts, train_tokenizer_with_stats

    if args.dataset is not None:
        texts = dataset_column_texts(args.dataset, args.column, split=args.split)
        name = f"{args.dataset} (column {args.column!r}, split {args.split!r})"
        out, stats = train_tokenizer_with_stats(None, args.out, args.vocab_size, texts=texts, corpus_name=name,
                            num_threads=args.num_threads, seed=0)
    else:
        out, stats = train_tokenizer_with_stats(args.input, args.out, args.vocab_size, texts=None, corpus_name=None,
                            num_threads=args.num_threads, seed=0)
    skipped = f", skipped {stats.skipped_too_long} over-long lines" if stats.skipped_too_long else ""
    if stats.sampled_from > stats.sentences:
        skipped += f", sampled from {stats.sampled_from} lines"
    print(f"wrote {out}: {Tokenizer(out).vocab_size} pieces from {stats.sentences} lines ({stats.bytes} bytes{skipped})")
    return 0


def tokenize_main(argv: list[str] | None = None) -> int:
    """Token ids and pieces of a text or a dialog, as JSON.

    INPUT is text, a path to a file, or - for stdin. With --chat it is a dialog: a JSON list of
    {"role", "content"} messages (or a chat record {"messages": [...]}), encoded in Meta's chat
    format; a dialog that ends with a user turn is shown as a generation prompt, one that ends with
    an assistant turn as a training example with its loss mask.
    """
    parser = new_parser("tokenize", tokenize_main.__doc__)
    parser.add_argument("--tokenizer", required=True, type=Path, metavar="MODEL", help="a SentencePiece .model file")
    parser.add_argument("--chat", action="store_true", help="INPUT is a dialog (JSON list of messages)")
    parser.add_argument("--text", action="store_true", help="INPUT is literal text even if a file of that name exists")
    parser.add_argument("--no-bos", dest="bos", action="store_false",
                        help="plain text: no BOS (default: BOS, as text completion)")
    parser.add_argument("--eos", action="store_true", help="plain text: append EOS")
    parser.add_argument("--loss-on", choices=("all_assistant", "last_assistant"), default="all_assistant",
                        help="chat: which answers the loss mask covers")
    parser.add_argument("--max-len", type=int, default=None, help="chat: context length (drops earliest exchanges)")
    parser.add_argument("input", metavar="INPUT", help="text, a file path, or - for stdin")
    args = parser.parse_args(argv)

    from llama2_lit.chat import encode_dialog, encode_prompt
    from llama2_lit.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.tokenizer)
    raw = _read_input(args.input, literal=args.text)
    if not args.chat:
        ids = tokenizer.encode(raw, bos=args.bos, eos=args.eos)
        print(_json_lines({"num_tokens": len(ids), "ids": ids, "pieces": tokenizer.pieces(ids)}))
        return 0
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as error:
        raise CommandError(f"--chat input is not JSON ({error}); expected a list of messages") from None
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "user":
        ids = encode_prompt(tokenizer, messages, max_len=args.max_len)
        record = {"kind": "prompt", "num_tokens": len(ids), "ids": ids, "pieces": tokenizer.pieces(ids),
                  "loss_mask": [0] * len(ids)}
    else:
        encoded = encode_dialog(tokenizer, messages, loss_on=args.loss_on, max_len=args.max_len)
        record = {"kind": "dialog", "num_tokens": len(encoded.ids), "ids": encoded.ids,
                  "pieces": tokenizer.pieces(encoded.ids), "loss_mask": encoded.loss_mask,
                  "dropped_exchanges": encoded.dropped_exchanges, "boundary_merges": encoded.boundary_merges}
    print(_json_lines(record))
    return 0


def _read_input(value: str, *, literal: bool) -> str:
    if value == "-":
        return sys.stdin.read()
    if not literal and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    return value


def _json_lines(record: dict[str, object]) -> str:
    # One key per line, lists kept on one line: readable for long token lists.
    body = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in record.items())
    return "{\n" + body + "\n}"
