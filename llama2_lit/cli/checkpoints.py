"""``llama2-lit convert`` and ``llama2-lit consolidate``: checkpoints from one layout to another."""

from __future__ import annotations

from pathlib import Path

from llama2_lit.cli.common import new_parser


def convert_main(argv: list[str] | None = None) -> int:
    """Convert a checkpoint (Meta, Hugging Face, ours or a stage's Lightning .ckpt; detected) to our
    layout or Hugging Face's.

    The tokenizer goes with the weights: the one given (--tokenizer), else the one found with the
    source (tokenizer.model in its folder, or the tokenizer_path a stage's .ckpt records).
    """
    from llama2_lit.config import DTYPES

    parser = new_parser("convert", convert_main.__doc__)
    parser.add_argument("src", type=Path, help="checkpoint folder (Meta / HF / ours) or a Lightning .ckpt file")
    parser.add_argument("dst", type=Path, help="output folder (written atomically)")
    parser.add_argument("--to", choices=("lit", "hf"), default="lit", help="output layout (lit: ours)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.model to include (default: the one found with the source, if any)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)

    from llama2_lit.checkpoints import convert

    summary = convert(args.src, args.dst, to=args.to, tokenizer_path=args.tokenizer,
                      dtype=DTYPES.get(args.dtype), overwrite=args.overwrite)
    print(summary)
    return 0


def consolidate_main(argv: list[str] | None = None) -> int:
    """Merge a sharded (FSDP2/DCP) Lightning checkpoint directory into one .ckpt file (model weights
    + config + tokenizer path) that `llama2-lit convert`, `generate` and `init_from` read."""
    parser = new_parser("consolidate", consolidate_main.__doc__)
    parser.add_argument("src", type=Path,
                        help="sharded checkpoint directory (e.g. runs/pretrain-nano/checkpoints/last.ckpt)")
    parser.add_argument("dst", type=Path, help="output .ckpt file")
    args = parser.parse_args(argv)

    from llama2_lit.parallelize import consolidate_checkpoint

    print(consolidate_checkpoint(args.src, args.dst))
    return 0
