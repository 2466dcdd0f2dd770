"""What the verbs share: one way to build a parser, the command-line error, and the arguments and
loading of a checkpoint with its tokenizer."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path


class CommandError(Exception):
    """A problem with the command line found after parsing (e.g. a prompt longer than the context)."""


def new_parser(verb: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``llama2-lit <verb>``: the same program name, layout and defaults shown for every verb.

    ``description`` is the verb's docstring: its first paragraph is the summary, the rest is shown
    under it as written.
    """
    return argparse.ArgumentParser(prog=f"llama2-lit {verb}", description=inspect.cleandoc(description),
                                   formatter_class=_Formatter)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The description kept as written; each option's default appended to its help, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_ or not action.option_strings:
            return help_
        return f"{help_} (default: %(default)s)"


def note(message: str) -> None:
    """A remark for the user on stderr (stdout carries only the verb's output)."""
    print(f"note: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------ checkpoints
def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``CHECKPOINT`` and ``--tokenizer``: the model a verb reads and the tokenizer to encode with."""
    parser.add_argument("checkpoint", type=Path,
                        help="our folder, a Meta or HF folder, or a stage's Lightning .ckpt")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="SentencePiece model (default: the one the checkpoint records, or "
                             "tokenizer.model in its folder)")


def resolve_tokenizer(checkpoint: Path, tokenizer: Path | None) -> Path:
    """``--tokenizer`` if given, else the checkpoint's own (said on stderr); an error if it has none."""
    if tokenizer is not None:
        return tokenizer
    from llama2_lit.checkpoints import find_tokenizer

    found = find_tokenizer(checkpoint)
    note(f"tokenizer {found} (from {checkpoint})")
    return found


def load_model_and_tokenizer(checkpoint: Path, tokenizer_path: Path | None, *, device: str, dtype: str):
    """The model and tokenizer a verb runs; an error when the tokenizer does not fit the model."""
    from llama2_lit.checkpoints import load_model
    from llama2_lit.config import DTYPES
    from llama2_lit.tokenizer import Tokenizer

    tokenizer_path = resolve_tokenizer(checkpoint, tokenizer_path)
    tokenizer = Tokenizer(tokenizer_path)
    model = load_model(checkpoint, device=device, dtype=DTYPES[dtype]).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CommandError(f"the tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the model "
                           f"{checkpoint} only {model.config.vocab_size} (vocab_size); pass the tokenizer it was "
                           "trained with (--tokenizer)")
    return model, tokenizer
