"""The toy world: a small generated universe in which every answer can be judged.

Real Llama 2 data is not public and real models need GPUs. The toy world
is a deterministic, generated universe — people, towns, realms, animals,
museum pieces, herbs, famous figures, arithmetic and words — with an oracle (``oracle.judge``)
that scores any response for helpfulness and safety. With it every stage of the recipe is
measurable on a CPU: pretraining perplexity, SFT accuracy, reward-model accuracy by rating,
best-of-K curves, PPO's true reward beside its reward-model reward, violation and false-refusal
rates, Ghost Attention adherence turn by turn.

``generate_world(out_dir, seed=0, size="default")`` writes the files listed in ``FILES``
(layout and formats: ``data/README.md``); the same seed and ``WORLD_VERSION`` give byte-identical
files on every machine. ``ensure_world`` generates on first use and verifies the checksums of
``manifest.json`` afterwards. ``llama2-lit world --out data/world --seed 0`` is the command.

Sizes: ``small`` (tests, notebooks: about a second) and ``default`` (a few million corpus tokens;
well under a minute).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from llama2_lit.data.build import Builder
from llama2_lit.data.corpus import CorpusWriter
from llama2_lit.data.entities import Universe, UniverseSize, build_universe
from llama2_lit.files import file_sha256

log = logging.getLogger(__name__)

WORLD_VERSION = "10"
"""Bump when the generator's output changes (and update ``EXPECTED_SHA256``)."""
DEFAULT_WORLD_DIR = Path(__file__).resolve().parents[2] / "data" / "world"
"""``data/world`` of the repository (generated on first use, git-ignored)."""


@dataclass(frozen=True)
class WorldSize:
    universe: UniverseSize
    corpus_words: int
    corpus_val_words: int
    sft_train: int
    sft_eval: int
    preference_helpful_train: int
    preference_helpful_eval: int
    preference_safety_train: int
    preference_safety_eval: int
    rl_prompts_train: int
    rl_prompts_eval: int
    gatt_train: int
    gatt_eval: int
    safety_eval: int
    borderline_eval: int


SIZES: dict[str, WorldSize] = {
    "small": WorldSize(
        UniverseSize(people=60, towns=12, realms=4, species=12, artifacts=16, herbs=8, figures=8, invented_words=80),
        corpus_words=60_000, corpus_val_words=3_000, sft_train=600, sft_eval=150,
        preference_helpful_train=400, preference_helpful_eval=100, preference_safety_train=300,
        preference_safety_eval=80, rl_prompts_train=300, rl_prompts_eval=80, gatt_train=120, gatt_eval=40,
        safety_eval=60, borderline_eval=60,
    ),
    "default": WorldSize(
        UniverseSize(people=240, towns=36, realms=6, species=28, artifacts=40, herbs=16, figures=16, invented_words=400),
        corpus_words=2_500_000, corpus_val_words=50_000, sft_train=12_000, sft_eval=1_000,
        preference_helpful_train=10_000, preference_helpful_eval=1_000, preference_safety_train=5_000,
        preference_safety_eval=600, rl_prompts_train=4_000, rl_prompts_eval=500, gatt_train=1_500, gatt_eval=200,
        # 210 borderline prompts, as the paper's borderline set (Fig 33)
        safety_eval=300, borderline_eval=210,
    ),
}

# file name -> (record kind, split, what it is)
FILES: dict[str, tuple[str, str, str]] = {
    "world.json": ("tables", "-", "the universe's tables (people, towns, ...) and splits"),
    "corpus_train.txt": ("text", "train", "pretraining documents, separated by blank lines"),
    "corpus_val.txt": ("text", "val", "held-out documents of the same distribution (perplexity)"),
    "sft_train.jsonl": ("chat", "train", "demonstrations: tasks, safe refusals, borderline answers, instructions"),
    "sft_eval.jsonl": ("chat", "eval", "the same, about held-out people/words/operands/templates"),
    "preference_helpful_train.jsonl": ("preference", "train", "helpfulness pairs with 4-level ratings"),
    "preference_helpful_eval.jsonl": ("preference", "eval", "held-out helpfulness pairs"),
    "preference_safety_train.jsonl": ("preference", "train", "safety pairs (18/47/35% safety categories)"),
    "preference_safety_eval.jsonl": ("preference", "eval", "held-out safety pairs"),
    "rl_prompts_train.jsonl": ("prompts", "train", "prompts for rejection sampling and PPO, is_safety tagged"),
    "rl_prompts_eval.jsonl": ("prompts", "eval", "held-out prompts (PPO early stopping, reports)"),
    "gatt_train.jsonl": ("chat", "train", "multi-turn dialogs under a system instruction (Ghost Attention)"),
    "gatt_eval.jsonl": ("prompts", "eval", "first turns + later user turns in meta, unseen constraint values and type"),
    "safety_eval.jsonl": ("prompts", "eval", "harmful requests from held-out templates and targets, by attack vector"),
    "borderline_eval.jsonl": ("prompts", "eval", "benign requests that look risky (false refusals)"),
}

# sha256 of every file of the world for (size, seed) at WORLD_VERSION; tests/test_world.py compares the
# manifests of fresh generations with these, so a generator change that alters the output is caught.
EXPECTED_SHA256: dict[tuple[str, int], dict[str, str]] = {
    ("small", 0): {
        "world.json": "20ca121964020665c07dc76f332653870315dde79e77c201bd4ed961aecf9275",
        "corpus_train.txt": "6d17debba563e6b1da8cf19e273a65cfc6c19ad520bd5d07af8185c3bb50fdb1",
        "corpus_val.txt": "3042dc911139cee115ccfd425c94f5d5e4fa4ed6898ac83c1ffc4b9345d9eae0",
        "sft_train.jsonl": "d910c6c934376049022a96c4668b840c861cead24b559c105e1f48ae64f7519a",
        "sft_eval.jsonl": "c259c183d58b4d3b3fb382ab93fd2b93d69dd6283a9e1d5ab03433b2ef5edf4c",
        "preference_helpful_train.jsonl": "1583d6fba07d76d7728d50fa5a6c5185a2318c8389bd4d647ff987a81aa3e15b",
        "preference_helpful_eval.jsonl": "959d89190a2fdba425f58b8860da4ff08aa63cee8348bd983ee593dfaab33675",
        "preference_safety_train.jsonl": "25e12fb5741d2b45c28121d22f550edf804c353d937e608c186849d10d31a3bb",
        "preference_safety_eval.jsonl": "aff1b8590cee28d17093a7e33794ab88d0ef8620dc8c29bf92386fda1d46bccd",
        "rl_prompts_train.jsonl": "38132bb6353cad3296c2de5b5774ff235899b25b37447cd18d6d6a04be4d1b0e",
        "rl_prompts_eval.jsonl": "85519fa7b94ffab86e02cfbc68723e3f12969326f54861f311710dd37d09c774",
        "gatt_train.jsonl": "0af7252f85964a65d6fae2762e6c821c91f60192ab15ec3452e70dcaf5ab1cb4",
        "gatt_eval.jsonl": "1a3aff33237e421ba87c4755fce542d3b5060714314bc3b6070dc6f3432eea6f",
        "safety_eval.jsonl": "e2a5279090b292bd8c756d5f3d5ea1566a1ef6f1e0e2798555583447faeedd1b",
        "borderline_eval.jsonl": "6f3cd0dc9b694bb9a9ce452074e5cc49c5872f68afa15d763b17d0e8d44743af",
    },
    ("default", 0): {
        "world.json": "c92b3ed8cfc5a27571869008f38b95f6a56fd8785243afc5851a159754e392c5",
        "corpus_train.txt": "77ddfc66b9c052c5fba3c2aa8aabdb3b5e566699e202dadefe99944bae8ae8b6",
        "corpus_val.txt": "6d00f7dca15ee637a069ee0fe9230d60e8ac74dfc8e05ac431e9500f1f5756f2",
        "sft_train.jsonl": "693f72fb475c6da8ba6414d0bafa1db344a0d729deead27f06e7f47bc61a8b61",
        "sft_eval.jsonl": "e84d680f2efe977102c81103d6d27ebd78861c327b87590ae809ee6f1e2e7476",
        "preference_helpful_train.jsonl": "e5579ba3714333d71c7304e3e25e18f8ab64c9ca6552c993ae4ec74c5cb62661",
        "preference_helpful_eval.jsonl": "8fd7a86e84cd7af7ec70bcabea8cedddc97a0f3c1541c869f2aa8bfa6cebc36c",
        "preference_safety_train.jsonl": "e5d18f88fa2c30861f3ab18f698f6efaff9d78f36bc1554a3df0cbb8e3d1112e",
        "preference_safety_eval.jsonl": "c0ed046728e07b46c52854b394a61a4ab9fc8498bd37a5d6eefaf94bbfeb90a1",
        "rl_prompts_train.jsonl": "c43684651ef4b3d0f78e78bcde7eac48123606a665cf0dcd646cc91f4971eaba",
        "rl_prompts_eval.jsonl": "e1c5f031639f1ab49c13e5b19b668e449572c857af194fda1fe9c1a012be47b7",
        "gatt_train.jsonl": "d2371a55bab656aa3e191ee521d8ae8cf508e1221bc6856a0194332a8bd0d7cb",
        "gatt_eval.jsonl": "705aafdc91f1875dfa868736fc4f80d1db1d86acdb470f747d7fb2a63b0db26e",
        "safety_eval.jsonl": "f1054a442553fa677393f325fae1fb8c0b3b1f11fc5e7618b8bf1d765b632be3",
        "borderline_eval.jsonl": "b1ca7f5aa674410226b61d27d2d196e4d466182e592e8e4a4faedc752df69556",
    },
}


def derive_rng(seed: int, name: str) -> random.Random:
    """An independent, reproducible random stream per file: changing how one file is drawn
    leaves every other file byte-identical."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _jsonl_lines(records: Iterable[dict]) -> Iterable[str]:
    for record in records:
        yield json.dumps(record, ensure_ascii=False) + "\n"


def _repeat(n: int, make: Callable[[], dict]) -> list[dict]:
    return [make() for _ in range(n)]


def world_records(universe: Universe, size: WorldSize, seed: int) -> dict[str, list[dict]]:
    """The records of every JSONL file, by file name."""
    out: dict[str, list[dict]] = {}
    builders = {(name, split): Builder(universe, split, derive_rng(seed, name))
                for name, split in (("sft_train", "train"), ("sft_eval", "eval"),
                                    ("preference_helpful_train", "train"), ("preference_helpful_eval", "eval"),
                                    ("preference_safety_train", "train"), ("preference_safety_eval", "eval"),
                                    ("rl_prompts_train", "train"), ("rl_prompts_eval", "eval"),
                                    ("gatt_train", "train"), ("gatt_eval", "eval"),
                                    ("safety_eval", "eval"), ("borderline_eval", "eval"))}
    b = lambda name: builders[(name, "train" if name.endswith("train") else "eval")]  # noqa: E731
    out["sft_train.jsonl"] = _repeat(size.sft_train, b("sft_train").sft_record)
    out["sft_eval.jsonl"] = _repeat(size.sft_eval, b("sft_eval").sft_record)
    out["preference_helpful_train.jsonl"] = _repeat(size.preference_helpful_train, b("preference_helpful_train").helpful_preference)
    out["preference_helpful_eval.jsonl"] = _repeat(size.preference_helpful_eval, b("preference_helpful_eval").helpful_preference)
    for name, n in (("preference_safety_train", size.preference_safety_train), ("preference_safety_eval", size.preference_safety_eval)):
        builder = b(name)
        pools = builder.safety_pools(max(20, n // 3))
        out[f"{name}.jsonl"] = _repeat(n, lambda: builder.safety_preference(*pools))
    out["rl_prompts_train.jsonl"] = _repeat(size.rl_prompts_train, b("rl_prompts_train").prompt_record)
    out["rl_prompts_eval.jsonl"] = _repeat(size.rl_prompts_eval, b("rl_prompts_eval").prompt_record)
    out["gatt_train.jsonl"] = _repeat(size.gatt_train, b("gatt_train").gatt_dialog)
    out["gatt_eval.jsonl"] = _repeat(size.gatt_eval, b("gatt_eval").gatt_eval_prompt)
    out["safety_eval.jsonl"] = _repeat(size.safety_eval, b("safety_eval").safety_eval_prompt)
    out["borderline_eval.jsonl"] = _repeat(size.borderline_eval, b("borderline_eval").borderline_eval_prompt)
    return out


def _write_world(directory: Path, seed: int, size_name: str) -> dict:
    size = SIZES[size_name]
    universe = build_universe(seed, size.universe)
    files: dict[str, dict] = {}

    def write(name: str, lines: Iterable[str], records: int, words: int) -> None:
        path = directory / name
        with path.open("w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(lines)
        kind, split, _ = FILES[name]
        files[name] = {"kind": kind, "split": split, "records": records, "words": words,
                       "bytes": path.stat().st_size, "sha256": file_sha256(path)}

    tables = universe.to_dict()
    write("world.json", [json.dumps(tables, ensure_ascii=False, indent=1) + "\n"], 1, 0)
    for name, n_words, stream in (("corpus_train.txt", size.corpus_words, "corpus_train"),
                                  ("corpus_val.txt", size.corpus_val_words, "corpus_val")):
        documents = list(CorpusWriter(universe, derive_rng(seed, stream)).documents(n_words))
        write(name, (doc + "\n\n" for doc in documents), len(documents), sum(len(d.split()) for d in documents))
    for name, records in world_records(universe, size, seed).items():
        words = sum(_record_words(r) for r in records)
        write(name, _jsonl_lines(records), len(records), words)
    manifest = {
        "name": "llama2_lit toy world", "version": WORLD_VERSION, "seed": seed, "size": size_name,
        "sizes": asdict(size),
        "universe": {"people": len(universe.people), "heldout_people": len(universe.people_in("heldout")),
                     "towns": len(universe.towns), "realms": len(universe.realms), "species": len(universe.species),
                     "artifacts": len(universe.artifacts), "herbs": len(universe.herbs), "figures": len(universe.figures),
                     "heists": len(universe.heists), "words_train": len(universe.words_train),
                     "words_heldout": len(universe.words_heldout)},
        "files": {name: files[name] for name in FILES},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    # a generated folder ignores itself in git (never commit megabytes of generated data)
    (directory / ".gitignore").write_text("# generated by `llama2-lit world`; regenerate instead of committing\n*\n")
    return manifest


def _record_words(record: dict) -> int:
    if "text" in record:
        return len(record["text"].split())
    messages = record.get("messages") or record.get("prompt") or []
    words = sum(len(m["content"].split()) for m in messages)
    for field in ("chosen", "rejected"):
        words += len(record.get(field, "").split())
    return words


def generate_world(out_dir: str | Path, *, seed: int = 0, size: str = "default") -> Path:
    """Writes the world's files into ``out_dir`` (replacing a previous world there) and returns
    it. Files are written into a temporary folder next to ``out_dir`` and swapped in at the end:
    an interrupted run never leaves a half-written world."""
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {sorted(SIZES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise FileExistsError(f"{out_dir} exists and is not a generated world (no manifest.json); refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the world is ordinary data
    try:
        _write_world(tmp, seed, size)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            old.rmdir()
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def verify_world(out_dir: str | Path) -> list[str]:
    """Problems of a generated world folder (missing manifest or files, checksum mismatches)."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing"]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    problems = []
    for name, info in manifest.get("files", {}).items():
        path = out_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif file_sha256(path) != info["sha256"]:
            problems.append(f"{path}: sha256 differs from manifest.json (edited or corrupted)")
    if set(manifest.get("files", {})) != set(FILES):
        problems.append(f"{manifest_path} lists other files than this version writes")
    return problems


def ensure_world(out_dir: str | Path = DEFAULT_WORLD_DIR, seed: int = 0, size: str = "default") -> Path:
    """The world at ``out_dir``: generated if missing, stale (other seed, size or generator
    version, or — where ``EXPECTED_SHA256`` knows this size and seed — other checksums than this
    generator writes) or failing its checksums; otherwise left as is (checksums verified)."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    reason = None
    if not manifest_path.is_file():
        reason = "not generated yet"
    else:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if (manifest.get("version"), manifest.get("seed"), manifest.get("size")) != (WORLD_VERSION, seed, size):
            reason = (f"it holds version {manifest.get('version')} seed {manifest.get('seed')} size {manifest.get('size')}, "
                      f"wanted version {WORLD_VERSION} seed {seed} size {size}")
        elif (size, seed) in EXPECTED_SHA256 and {n: f["sha256"] for n, f in manifest.get("files", {}).items()} != EXPECTED_SHA256[(size, seed)]:
            reason = "it was written by another version of the generator"
        else:
            problems = verify_world(out_dir)
            if problems:
                reason = "; ".join(problems)
    if reason is not None:
        log.warning("generating the toy world in %s (%s)", out_dir, reason)
        generate_world(out_dir, seed=seed, size=size)
    return out_dir


def load_universe(out_dir: str | Path) -> dict:
    """The tables of a generated world (``world.json``)."""
    return json.loads((Path(out_dir) / "world.json").read_text(encoding="utf-8"))
