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

WORLD_VERSION = "1"
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
    "gatt_eval.jsonl": ("prompts", "eval", "first turns + later user turns in meta, unseen constraint values"),
    "safety_eval.jsonl": ("prompts", "eval", "harmful requests from held-out templates and targets"),
    "borderline_eval.jsonl": ("prompts", "eval", "benign requests that look risky (false refusals)"),
}

# sha256 of every file of the world for (size, seed) at WORLD_VERSION; tests/test_world.py compares the
# manifests of fresh generations with these, so a generator change that alters the output is caught.
EXPECTED_SHA256: dict[tuple[str, int], dict[str, str]] = {
    ("small", 0): {
        "world.json": "20ca121964020665c07dc76f332653870315dde79e77c201bd4ed961aecf9275",
        "corpus_train.txt": "449a50f88125bdfca964fd1abf2d865f0f0b41d21a08f39fb73f950005e27186",
        "corpus_val.txt": "e1edd0bfe60999838fabeacc38e433e71b3c313b4540fb4784ed4ec80ec46a8d",
        "sft_train.jsonl": "181f89037b378025350389cefbdc8d1dbf9576fed69888378f95aaddc35c1bd8",
        "sft_eval.jsonl": "24d6ef1dac272d0c8f53ba6787ae5ce01cde371f5b12d636f14f0d1da5b360b1",
        "preference_helpful_train.jsonl": "451687b65d7bcc5e19656191d1ff591f6cabe0a48c8e2201a7477ab051410d86",
        "preference_helpful_eval.jsonl": "bb01b772609fd5344e84343ec884de9c740ab2814fcaaf8ff6fb620dd3bac88b",
        "preference_safety_train.jsonl": "0a790acdc2ef743fc6f33854796732675d924e1a0a319f91d17754e4afacbf07",
        "preference_safety_eval.jsonl": "28848312c9ad2fa68ef96cb074a3ee4824bbff7459ca37fd1bdccfc55233347e",
        "rl_prompts_train.jsonl": "f5c8859e16afaaaa0d3d2edd6a0f83874f1b29cd5311fa428c62f70c1c6e5758",
        "rl_prompts_eval.jsonl": "ee35dfa0f2a51d057676032bd80407b0ec639e454922b03102b948d04db54643",
        "gatt_train.jsonl": "8cb4571309b8e58553104b9c5d6061a265486327e5b29229fbad87c2e20ebe65",
        "gatt_eval.jsonl": "e1414b51ed66c15ef19721640ba290a2e52d0a791db04ce15fa93fa98b629add",
        "safety_eval.jsonl": "5035279ca8aa2ba84c641287c19f0d3fa44beb54186a950376b12d22502f697c",
        "borderline_eval.jsonl": "6f3cd0dc9b694bb9a9ce452074e5cc49c5872f68afa15d763b17d0e8d44743af",
    },
    ("default", 0): {
        "world.json": "c92b3ed8cfc5a27571869008f38b95f6a56fd8785243afc5851a159754e392c5",
        "corpus_train.txt": "609257b8a05b4fd38c780181cf20680888c91a9f206d64232aadf9fc815fc7c7",
        "corpus_val.txt": "1e1240b09b7242c835b0ea116463b58999f0fbb8da1e3f13effa8429bc2a0bd3",
        "sft_train.jsonl": "6e3017d672b9e51b417f21e9c9b865f65d01c1e676c5687f5480ec7c8a148ef7",
        "sft_eval.jsonl": "a7b1bbcf5c070076e8d012c67f0cfb1a433d9f3b61c363e92eba916637424517",
        "preference_helpful_train.jsonl": "103f927153fc383665011b0377fb373690aa712237e84db36b7630a2ebf4f41f",
        "preference_helpful_eval.jsonl": "34f208c46a3b30e4e4952fc1b9b31c3984535f5d49b056af5120a2d3caeb8786",
        "preference_safety_train.jsonl": "097b2a07d806bf38e10be3a05b0fda34dd39a125664ea6405e0a63bb87781725",
        "preference_safety_eval.jsonl": "4f032b23dd3577eed0368e349fc7614497e345ca070cbda6557340cdbd14b539",
        "rl_prompts_train.jsonl": "714b8b3a01723c7cfa4614a70dda202b6ed2ac3d26245d6c9c02925b326fa5ae",
        "rl_prompts_eval.jsonl": "11c057eeeb15fb9d6031b2ced1fb2f6dde2432d053003b7b443dbe1b145b4c29",
        "gatt_train.jsonl": "c6c45702826f19083dac43b562516230eaaed3753c97543c10759a3010661ba4",
        "gatt_eval.jsonl": "c8290ffd65b176c0f11e8c6b049a54de9b1e0cd23fdaa3b296480e52e5928ef8",
        "safety_eval.jsonl": "8ff21ebb3cbff55d015997d8274cc4b59d5b51776f8d3f0b708e0aa9ba8c3e64",
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
