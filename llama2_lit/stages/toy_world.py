"""The toy world's files and tokenizer where the configs expect them, made on first use.

``configs/nano`` and ``configs/micro`` train on the generated toy world (``llama2_lit.data.world``)
with a 4096-piece tokenizer trained on its pretraining corpus (the course sizes' vocabulary,
``config.COURSE_VOCAB_SIZE``). Neither is committed (both are generated, deterministically, in
seconds), so ``ensure_toy_assets`` makes them when missing:

    data/world/                    generate_world(seed=0, size="default"), checksummed
    data/tokenizer/toy-4096.model  train_tokenizer(data/world/corpus_train.txt, 4096)

The CLI calls it when a config names a path under ``data/world/`` or ``data/tokenizer/`` that
does not exist yet (paths are relative to the repository root, where commands run).
"""

from __future__ import annotations

from pathlib import Path

from llama2_lit.config import COURSE_VOCAB_SIZE

WORLD_DIR = Path("data/world")
TOKENIZER_PATH = Path("data/tokenizer") / f"toy-{COURSE_VOCAB_SIZE}.model"
TOY_PREFIXES = ("data/world/", "data/tokenizer/")


def ensure_toy_assets(root: str | Path = ".", *, size: str = "default", seed: int = 0,
                      vocab_size: int = COURSE_VOCAB_SIZE) -> tuple[Path, Path]:
    """(world directory, tokenizer model) under ``root``, generated/trained if missing.

    ``size="small"`` builds the small world (seconds; tests and CI notebooks); its corpus is too
    small for 4096 pieces, so give it a smaller ``vocab_size``, and the tokenizer file is named
    after it (``toy-<vocab_size>.model``).
    """
    from llama2_lit.data.world import ensure_world
    from llama2_lit.tokenizer import train_tokenizer

    root = Path(root)
    world = ensure_world(root / WORLD_DIR, seed=seed, size=size)
    tokenizer = root / TOKENIZER_PATH.with_name(f"toy-{vocab_size}.model")
    stamp = tokenizer.with_suffix(".source")
    source = f"{(world / 'manifest.json').read_text()}\nvocab_size={vocab_size}\n"
    if not tokenizer.is_file() or not stamp.is_file() or stamp.read_text() != source:
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        ignore = tokenizer.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# trained by llama2_lit.stages.toy_world; regenerate instead of committing\n*\n")
        print(f"training the toy world's {vocab_size}-piece tokenizer -> {tokenizer}")
        train_tokenizer(world / "corpus_train.txt", tokenizer, vocab_size)
        stamp.write_text(source)  # which world it was trained on: retrain when the world changes
    return world, tokenizer


def missing_toy_paths(values: object) -> list[str]:
    """Paths under ``data/world/`` or ``data/tokenizer/`` in a (nested) config that do not exist."""
    if isinstance(values, str):
        return [values] if values.startswith(TOY_PREFIXES) and not Path(values).exists() else []
    if isinstance(values, dict):
        return [path for value in values.values() for path in missing_toy_paths(value)]
    if isinstance(values, (list, tuple)):
        return [path for value in values for path in missing_toy_paths(value)]
    return []
