"""The ``llama2-lit`` command.

Training verbs (``fit``, ``validate``, ``test``) go to LightningCLI; the other verbs are small
commands, each a ``main(argv)`` function in the module that owns the feature. Modules are imported
only when their verb runs, so ``llama2-lit tokenize`` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
import sys

# verb -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("llama2_lit.stages.cli:lightning_main", "train a stage from a YAML config (LightningCLI)"),
    "validate": ("llama2_lit.stages.cli:lightning_main", "validate a stage (LightningCLI)"),
    "test": ("llama2_lit.stages.cli:lightning_main", "test a stage (LightningCLI)"),
    "convert": ("llama2_lit.checkpoints:convert_main", "convert a checkpoint between Meta, HF and our format"),
    "consolidate": ("llama2_lit.parallelize:consolidate_main",
                    "merge a sharded (FSDP2) checkpoint directory into one .ckpt file"),
    "tokenizer": ("llama2_lit.tokenizer:tokenizer_main", "train a SentencePiece tokenizer with Llama 2's settings"),
    "tokenize": ("llama2_lit.tokenizer:tokenize_main", "show the token ids and pieces of a text or a dialog"),
    "generate": ("llama2_lit.generation:generate_main", "sample completions from a checkpoint"),
    "chat": ("llama2_lit.generation:chat_main", "chat with a checkpoint in the Llama 2 chat format"),
    "world": ("llama2_lit.data.world:world_main", "generate the toy world's data files"),
    "data": ("llama2_lit.data.records:data_main", "validate data files (`llama2-lit data validate FILE --kind KIND`)"),
    "sample": ("llama2_lit.sampling.rejection:sample_main",
               "rejection sampling: best-of-K samples scored by the reward models, pooled (paper 3.2.3)"),
    "runs": ("llama2_lit.runs:runs_main", "tabulate and plot the metrics of several local runs"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llama2-lit <command> [args]", "", "commands:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in COMMANDS.items()]
    lines += ["", "`llama2-lit <command> --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"llama2-lit: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, function_name = COMMANDS[verb][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    # Training verbs keep their verb (LightningCLI parses it as a subcommand).
    result = function(argv if module_name.endswith("stages.cli") else rest)
    raise SystemExit(result or 0)
