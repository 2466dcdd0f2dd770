"""The ``llama2-lit`` command: every verb, in one place.

Training verbs (``fit``, ``validate``, ``test``) go to LightningCLI (``llama2_lit.stages.cli``);
every other verb is a ``<verb>_main(argv) -> int`` function in a module of this package, built on
``llama2_lit.cli.common.new_parser`` so that every ``--help`` reads the same way. The library
modules they call parse no arguments. Modules are imported only when their verb runs, so
``llama2-lit tokenize`` does not pay for importing Lightning.

Errors: a verb (or the library under it) raises; ``main`` turns every known failure into one line
``llama2-lit <verb>: error: <what, where, what to do>`` on stderr and exit status 2, never a
traceback. Known failures are the library's own error types (``CheckpointError``,
``RecordError``, ``ChatFormatError``, ... all ``ValueError``), file errors (``OSError``) and
``CommandError`` (a command-line problem found after parsing). Set ``LLAMA2_LIT_TRACEBACK=1`` to
see the traceback anyway. Anything else is a bug and keeps its traceback.

Adding a verb: write ``<verb>_main(argv)`` in a module here (or next to the others of its
feature), parse with ``new_parser``, call the library, raise on failure; add one line to
``COMMANDS``.
"""

from __future__ import annotations

import importlib
import os
import sys

from llama2_lit.cli.common import CommandError

# verb -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("llama2_lit.stages.cli:lightning_main", "train a stage from a YAML config (LightningCLI)"),
    "validate": ("llama2_lit.stages.cli:lightning_main", "validate a stage (LightningCLI)"),
    "test": ("llama2_lit.stages.cli:lightning_main", "test a stage (LightningCLI)"),
    "demo": ("llama2_lit.cli.pipeline:demo_main", "the recipe end to end on the toy world (`make demo`)"),
    "pipeline": ("llama2_lit.cli.pipeline:demo_main", "the same as demo"),
    "evaluate": ("llama2_lit.cli.evaluate:evaluate_main",
                 "the evaluation suite on checkpoints: oracle scores, win rates, reward-model accuracy"),
    "convert": ("llama2_lit.cli.checkpoints:convert_main", "convert a checkpoint between Meta, HF and our format"),
    "consolidate": ("llama2_lit.cli.checkpoints:consolidate_main",
                    "merge a sharded (FSDP2) checkpoint directory into one .ckpt file"),
    "tokenizer": ("llama2_lit.cli.tokenizer:tokenizer_main", "train a SentencePiece tokenizer with Llama 2's settings"),
    "tokenize": ("llama2_lit.cli.tokenizer:tokenize_main", "show the token ids and pieces of a text or a dialog"),
    "generate": ("llama2_lit.cli.generation:generate_main", "sample completions from a checkpoint"),
    "chat": ("llama2_lit.cli.generation:chat_main", "chat with a checkpoint in the Llama 2 chat format"),
    "world": ("llama2_lit.cli.data:world_main", "generate the toy world's data files"),
    "data": ("llama2_lit.cli.data:data_main", "validate data files (`llama2-lit data validate FILE --kind KIND`)"),
    "runs": ("llama2_lit.cli.runs:runs_main", "tabulate and plot the metrics of several local runs"),
    "annotate": ("llama2_lit.cli.reward:annotate_main",
                 "sample two responses per prompt from a policy; the oracle annotates preference pairs"),
    "reward": ("llama2_lit.cli.reward:reward_main",
               "reward-model tools (`llama2-lit reward score CKPT --data FILE`)"),
    "sample": ("llama2_lit.cli.sampling:sample_main",
               "rejection sampling: best-of-K samples scored by the reward models, pooled (paper 3.2.3)"),
    "gatt": ("llama2_lit.cli.sampling:gatt_main",
             "Ghost Attention data: dialogs sampled with the instruction on every turn, trained with it on the first (3.3)"),
    "distill": ("llama2_lit.cli.sampling:distill_main",
                "safety context distillation data: answers with a safety preprompt the safety RM prefers (4.2.4)"),
}

# The failures a user can cause (bad files, bad values); anything else is a bug and keeps its traceback.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, CommandError)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llama2-lit <command> [args]", "", "commands:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in COMMANDS.items()]
    lines += ["", "`llama2-lit <command> --help` describes each command."]
    return "\n".join(lines)


def error_line(verb: str, error: BaseException) -> str:
    """The one line a known failure prints: ``llama2-lit <verb>: error: <message>``.

    A known error raised *because of* another known one (jsonargparse wraps the ``ValueError`` of a
    class it could not build in its own multi-line one) is told by the one that started it.
    """
    while isinstance(error.__cause__, KNOWN_ERRORS):
        error = error.__cause__
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{error.filename}: {message}"
    return f"llama2-lit {verb}: error: {message}"


def run_verb(verb: str, argv: list[str]) -> int:
    """Run one verb with its arguments; a known failure becomes ``error_line`` and status 2."""
    module_name, function_name = COMMANDS[verb][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        # Training verbs keep their verb (LightningCLI parses it as a subcommand).
        return function([verb, *argv] if module_name.endswith("stages.cli") else argv) or 0
    except KNOWN_ERRORS as error:
        if os.environ.get("LLAMA2_LIT_TRACEBACK"):
            raise
        print(error_line(verb, error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama2-lit {verb}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"llama2-lit: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(run_verb(verb, rest))
