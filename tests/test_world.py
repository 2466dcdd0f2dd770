"""The toy world: determinism and checksums, disjoint splits, rating noise and safety categories,
every file loadable as its record kind, ensure_world and the `world` command."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from llama2_lit.cli.data import world_main
from llama2_lit.data import safety
from llama2_lit.data.build import Builder
from llama2_lit.data.entities import build_universe
from llama2_lit.data.oracle import judge
from llama2_lit.data.preferences import P_AGREE, SAFETY_MIX, annotate, rating_for_gap
from llama2_lit.data.records import RATINGS, load_records
from llama2_lit.data.tasks import arithmetic_split
from llama2_lit.data.world import (
    EXPECTED_SHA256,
    FILES,
    SIZES,
    WORLD_VERSION,
    ensure_world,
    generate_world,
    verify_world,
)

TRAIN_FILES = ("sft_train.jsonl", "preference_helpful_train.jsonl", "preference_safety_train.jsonl",
               "rl_prompts_train.jsonl", "gatt_train.jsonl")
EVAL_FILES = ("sft_eval.jsonl", "preference_helpful_eval.jsonl", "preference_safety_eval.jsonl", "rl_prompts_eval.jsonl",
              "gatt_eval.jsonl", "safety_eval.jsonl", "borderline_eval.jsonl")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    return generate_world(tmp_path_factory.mktemp("world") / "world", seed=0, size="small")


def read(world: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (world / name).read_text(encoding="utf-8").splitlines()]


def tables(world: Path) -> dict:
    return json.loads((world / "world.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ determinism
def test_same_seed_gives_byte_identical_files(small_world: Path, tmp_path: Path) -> None:
    again = generate_world(tmp_path / "again", seed=0, size="small")
    for name in [*FILES, "manifest.json"]:
        assert (again / name).read_bytes() == (small_world / name).read_bytes(), name
    other = generate_world(tmp_path / "other", seed=1, size="small")
    assert (other / "corpus_train.txt").read_bytes() != (small_world / "corpus_train.txt").read_bytes()


def test_small_world_checksums_match_the_expected_values(small_world: Path) -> None:
    """A generator change that alters the output fails here: bump WORLD_VERSION and update
    EXPECTED_SHA256 (the values printed below)."""
    manifest = json.loads((small_world / "manifest.json").read_text())
    got = {name: info["sha256"] for name, info in manifest["files"].items()}
    assert manifest["version"] == WORLD_VERSION
    assert got == EXPECTED_SHA256[("small", 0)], json.dumps(got, indent=1)


@pytest.mark.slow
def test_default_world_checksums_match_the_expected_values(tmp_path: Path) -> None:
    world = generate_world(tmp_path / "world", seed=0, size="default")
    manifest = json.loads((world / "manifest.json").read_text())
    got = {name: info["sha256"] for name, info in manifest["files"].items()}
    assert got == EXPECTED_SHA256[("default", 0)], json.dumps(got, indent=1)
    # the default corpus is "a few million tokens": about 1.5 tokens per word with a 4k vocabulary
    assert 2_000_000 <= manifest["files"]["corpus_train.txt"]["words"] <= 3_000_000


def test_manifest_describes_the_files(small_world: Path) -> None:
    manifest = json.loads((small_world / "manifest.json").read_text())
    assert list(manifest["files"]) == list(FILES)
    size = SIZES["small"]
    counts = {name: info["records"] for name, info in manifest["files"].items()}
    assert counts["sft_train.jsonl"] == size.sft_train and counts["borderline_eval.jsonl"] == size.borderline_eval
    for name, info in manifest["files"].items():
        assert info["bytes"] == (small_world / name).stat().st_size
    assert verify_world(small_world) == []
    assert (small_world / ".gitignore").read_text().splitlines()[-1] == "*"


# ------------------------------------------------------------------------------ every kind loads
def test_every_file_loads_as_its_record_kind(small_world: Path) -> None:
    manifest = json.loads((small_world / "manifest.json").read_text())
    for name, (kind, _, _) in FILES.items():
        if kind == "tables":
            continue
        records = load_records(small_world / name, kind)
        assert len(records) == manifest["files"][name]["records"], name
        if kind != "text":
            assert all("meta" in r for r in records), name


def test_prompts_are_tagged_and_safety_eval_is_all_harmful(small_world: Path) -> None:
    rl = read(small_world, "rl_prompts_train.jsonl")
    assert {r["is_safety"] for r in rl} == {True, False}
    assert all(r["is_safety"] == (r["meta"]["category"] == "harmful") for r in rl)
    assert all(r["is_safety"] and r["meta"]["category"] == "harmful" for r in read(small_world, "safety_eval.jsonl"))
    assert all(not r["is_safety"] and r["meta"]["category"] == "borderline" for r in read(small_world, "borderline_eval.jsonl"))
    categories = Counter(r["meta"]["risk_category"] for r in read(small_world, "safety_eval.jsonl"))
    assert set(categories) == set(safety.RISK_CATEGORIES)


# ------------------------------------------------------------------------------ content
def test_corpus_has_no_chat_format_and_no_refusals(small_world: Path) -> None:
    for name in ("corpus_train.txt", "corpus_val.txt"):
        text = (small_world / name).read_text()
        for tag in ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "Human:", "Assistant:"):
            assert tag not in text, (name, tag)
        assert not any(p.search(text.lower()) for p in safety.REFUSAL_PATTERNS), name
        lowered = f" {re.sub(r'[^a-z0-9]+', ' ', text.lower())} "
        assert not [w for w in safety.INSULTS if f" {w} " in lowered], name


def test_corpus_has_paraphrases_and_a_meaningful_vocabulary(small_world: Path) -> None:
    text = (small_world / "corpus_train.txt").read_text()
    person = tables(small_world)["people"][0]
    # the hometown fact in several wordings
    wordings = [f"{person['first']} lives in {person['town']}", f"makes her home in {person['town']}",
                f"makes his home in {person['town']}", f"is a resident of {person['town']}",
                f"{person['town']} is the home town of {person['name']}"]
    assert sum(w in text for w in wordings) >= 2
    assert len(set(re.findall(r"[A-Za-z]+", text))) > 1000


def test_tasks_have_a_difficulty_gradient(small_world: Path) -> None:
    records = read(small_world, "sft_train.jsonl")
    difficulties = Counter(r["meta"].get("difficulty") for r in records if r["meta"]["category"] == "task")
    assert {1, 2, 3} <= set(difficulties)
    tasks = {r["meta"]["task"].split(".")[0] for r in records}
    assert {"fact", "twohop", "arith", "string", "count", "compare", "list", "harmful", "borderline"} <= tasks
    assert sum(len(r["messages"]) > 3 for r in records) > len(records) // 10  # multi-turn dialogs
    systems = [r for r in records if r["messages"][0]["role"] == "system"]
    assert systems and all(r["meta"]["constraints"] for r in systems)


def test_gatt_dialogs_are_multi_turn_with_short_and_full_instructions(small_world: Path) -> None:
    records = read(small_world, "gatt_train.jsonl")
    assert min(sum(m["role"] == "user" for m in r["messages"]) for r in records) >= 3
    systems = [r["messages"][0]["content"] for r in records]
    assert all(r["messages"][0]["role"] == "system" for r in records)
    short = sum(s == r["meta"]["system_short"] for s, r in zip(systems, records))
    assert 0.3 < short / len(records) < 0.7  # "half of the time" (paper 3.3)
    kinds = Counter(len(r["meta"]["constraints"]) for r in records)
    assert {1, 2, 3} <= set(kinds)  # combinations


# ------------------------------------------------------------------------------ disjoint splits
def _text_of(record: dict) -> str:
    parts = [m["content"] for m in record.get("messages") or record.get("prompt") or []]
    parts += [record.get("chosen", ""), record.get("rejected", "")]
    return "\n".join(parts)


def test_train_files_never_mention_held_out_entities(small_world: Path) -> None:
    world = tables(small_world)
    held_people = [p for p in world["people"] if p["split"] == "heldout"]
    held_names = [p["name"] for p in held_people] + [p["first"] for p in held_people]
    held_names += [f["name"] for f in world["figures"] if f["split"] == "heldout"]
    held_names += [a["name"] for a in world["artifacts"] if a["split"] == "heldout"]
    held_names += [h["name"] for h in world["herbs"] if h["split"] == "heldout"]
    invented_held = [w for w in world["words_heldout"] if w not in {x.lower() for x in _english()}]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, held_names + invented_held)) + r")\b", re.IGNORECASE)
    for name in TRAIN_FILES:
        for record in read(small_world, name):
            match = pattern.search(_text_of(record))
            assert match is None, (name, match and match.group(0), _text_of(record)[:200])


def _english() -> tuple[str, ...]:
    from llama2_lit.data.lexicon import ENGLISH_WORDS

    return ENGLISH_WORDS


def _metas(record: dict) -> list[dict]:
    meta = record["meta"]
    turns = meta.get("turns") or [meta]
    return [t.get("meta", t) for t in turns]


def test_eval_questions_are_about_held_out_entities(small_world: Path) -> None:
    world = tables(small_world)
    held_people = {p["name"] for p in world["people"] if p["split"] == "heldout"}
    held_first = {p["first"] for p in world["people"] if p["split"] == "heldout"}
    held_words = set(world["words_heldout"])
    train_words = set(world["words_train"])
    held_targets = held_people | {e["name"] for kind in ("artifacts", "herbs") for e in world[kind] if e["split"] == "heldout"}
    for name in EVAL_FILES:
        for record in read(small_world, name):
            for meta in _metas(record):
                task = meta["task"]
                assert meta["split"] == "eval", (name, meta)
                if task.startswith(("fact.hometown", "fact.age", "fact.job", "twohop", "compare.older")):
                    assert set(meta["subject"]) & held_people, (name, meta)
                if task.startswith(("string.reverse", "string.spell", "count.letters")):
                    assert meta["subject"][0] in held_words and meta["subject"][0] not in train_words
                if task == "count.people" and name == "sft_eval.jsonl" and "turns" not in record["meta"]:
                    listed = set(re.findall(r"\b[A-Z][a-z]+\b", record["messages"][-2]["content"]))
                    all_first = {p["first"] for p in world["people"]}
                    assert listed & all_first and listed & all_first <= held_first, record
                if task.startswith("harmful."):
                    template = next(t for t in safety.HARMFUL_TEMPLATES if t.id == meta["template"])
                    assert meta["template_split"] == template.split
                    if template.split == "train":  # a training template, on a held-out target
                        assert template.target in safety.HELD_OUT_TARGETS and meta["subject"][0] in held_targets
                if task.startswith("borderline."):
                    template = next(t for t in safety.BORDERLINE_TEMPLATES if t.id == meta["template"])
                    assert template.split == "eval"
    for name in TRAIN_FILES:
        for record in read(small_world, name):
            for meta in _metas(record):
                assert meta.get("split") == "train", (name, meta)
                if meta["task"].startswith(("harmful.", "borderline.")):
                    templates = safety.HARMFUL_TEMPLATES + safety.BORDERLINE_TEMPLATES
                    assert next(t for t in templates if t.id == meta["template"]).split == "train"


def test_arithmetic_pairs_are_split(small_world: Path) -> None:
    """Eval operand pairs never appear in training questions nor in the pretraining corpus."""
    corpus = (small_world / "corpus_train.txt").read_text()
    for a, b in re.findall(r"\b(\d+) (?:\+|plus|-|minus|\*|times) (\d+)\b", corpus):
        assert arithmetic_split(int(a), int(b)) == "train", (a, b)
    for name, expected in (("sft_train.jsonl", "train"), ("sft_eval.jsonl", "eval")):
        for record in read(small_world, name):
            if record["meta"]["task"] in ("arith.add", "arith.sub", "arith.add_small", "arith.add_large", "arith.mul"):
                a, b = map(int, re.findall(r"\d+", record["messages"][-2]["content"])[:2])
                assert arithmetic_split(a, b) == expected


def test_held_out_people_appear_in_the_corpus_but_only_in_prose(small_world: Path) -> None:
    world = tables(small_world)
    corpus = (small_world / "corpus_train.txt").read_text()
    documents = corpus.split("\n\n")
    for person in (p for p in world["people"] if p["split"] == "heldout"):
        assert person["name"] in corpus
        assert not any(d.startswith(f"A traveller met {person['name']}") for d in documents)


# ------------------------------------------------------------------------------ preference pairs
def test_no_pair_prefers_an_unsafe_response_to_a_safe_one(small_world: Path) -> None:
    for name in ("preference_helpful_train.jsonl", "preference_helpful_eval.jsonl", "preference_safety_train.jsonl",
                 "preference_safety_eval.jsonl"):
        for record in read(small_world, name):
            assert record["chosen_safe"] or not record["rejected_safe"], record
            assert record["chosen"].strip() != record["rejected"].strip()


def test_annotations_agree_with_the_oracle(small_world: Path) -> None:
    for name in ("preference_helpful_train.jsonl", "preference_safety_train.jsonl"):
        for record in read(small_world, name):
            note, meta = record["meta"]["annotation"], record["meta"]
            jc, jr = judge(record["prompt"], record["chosen"], meta), judge(record["prompt"], record["rejected"], meta)
            sc, sr = ((jc.helpfulness, jr.helpfulness) if note["axis"] == "helpfulness" else (jc.safety_score, jr.safety_score))
            assert (round(sc, 6), round(sr, 6)) == (note["chosen_score"], note["rejected_score"])
            assert note["annotator_agrees"] == (sc > sr)
            assert record["rating"] == rating_for_gap(abs(sc - sr))
            assert (record["chosen_safe"], record["rejected_safe"]) == (jc.safe, jr.safe)


def test_pairs_hold_the_policy_s_own_mistakes(small_world: Path) -> None:
    """The mistakes a reward model must learn to punish: a correct fact that answers another question
    (another person, other operands), an answer spliced into an unrelated sentence, and a needless
    refusal in the shape of the best-practice refusal of a harmful request (decline, explain, offer
    an alternative)."""
    records = read(small_world, "preference_helpful_train.jsonl") + read(small_world, "preference_safety_train.jsonl")
    other = [r for r in records if "other_subject" in (r["meta"]["annotation"]["chosen_kind"],
                                                       r["meta"]["annotation"]["rejected_kind"])]
    assert len(other) >= 30
    for r in other:
        note = r["meta"]["annotation"]
        text = r["chosen"] if note["chosen_kind"] == "other_subject" else r["rejected"]
        concise = r["meta"]["reference"]
        assert text.strip() != concise.strip()
        if {note["chosen_kind"], note["rejected_kind"]} == {"concise", "other_subject"}:
            assert note["chosen_score" if note["chosen_kind"] == "concise" else "rejected_score"] == 1.0
    garbled = [r for r in records if "garbled" in (r["meta"]["annotation"]["chosen_kind"],
                                                   r["meta"]["annotation"]["rejected_kind"])]
    assert len(garbled) >= 30 and {r["meta"]["category"] for r in garbled} == {"task", "borderline", "harmful"}
    styled = [(r, text) for r in records for kind, text in ((r["meta"]["annotation"]["chosen_kind"], r["chosen"]),
                                                            (r["meta"]["annotation"]["rejected_kind"], r["rejected"]))
              if kind == "refusal" and any(a in text for a in safety.NEEDLESS_ALTERNATIVES)]
    assert len(styled) >= 20
    for r, text in styled:
        assert r["meta"]["category"] in ("task", "borderline")
        judged = judge(r["prompt"], text, r["meta"])
        assert judged.refusal and judged.helpfulness == 0.0


def test_rating_noise_grows_as_the_gap_shrinks() -> None:
    """On a large sample of simulated annotations, the chosen response is the oracle-better one
    with probability P_AGREE[rating] (0.96 -> 0.56), within 3.5 binomial standard deviations."""
    rng = random.Random(0)
    agree: dict[str, list[bool]] = defaultdict(list)
    for _ in range(20_000):
        a, b = rng.random(), rng.random()
        if a == b:
            continue
        note = annotate(a, b, rng)
        agree[note.rating].append(note.first_is_chosen == (a > b))
    for rating, p in zip(RATINGS, P_AGREE):
        n = len(agree[rating])
        rate = sum(agree[rating]) / n
        assert n > 1000 and abs(rate - p) < 3.5 * (p * (1 - p) / n) ** 0.5, (rating, rate, p, n)
    assert [rating_for_gap(g) for g in (0.9, 0.55, 0.3, 0.1, 0.01)] == [
        "significantly_better", "significantly_better", "better", "slightly_better", "negligibly_better"]


def test_world_pairs_follow_the_rating_noise_and_safety_mix() -> None:
    """Drawn through the world's own builders (not the small files): 2,000 helpfulness and 2,000
    safety pairs."""
    from llama2_lit.data.world import SIZES as sizes

    universe = build_universe(0, sizes["small"].universe)
    builder = Builder(universe, "train", random.Random(1))
    helpful = [builder.helpful_preference() for _ in range(2000)]
    pools = builder.safety_pools(100)
    safe_pairs = [builder.safety_preference(*pools) for _ in range(2000)]
    agree: dict[str, list[bool]] = defaultdict(list)
    for record in helpful:
        agree[record["rating"]].append(record["meta"]["annotation"]["annotator_agrees"])
    for rating, p in zip(RATINGS, P_AGREE):
        n = len(agree[rating])
        assert n > 100, (rating, n)
        rate = sum(agree[rating]) / n
        assert abs(rate - p) < 3.5 * (p * (1 - p) / n) ** 0.5 + 1e-9, (rating, rate, p, n)
    # rating strength and agreement fall together (paper Table 8's shape)
    rates = [sum(agree[r]) / len(agree[r]) for r in RATINGS]
    assert rates == sorted(rates, reverse=True)
    categories = Counter(r["meta"]["annotation"]["safety_category"] for r in safe_pairs)
    assert "unsafe_safe" not in categories
    for category, share in SAFETY_MIX:
        assert abs(categories[category] / len(safe_pairs) - share) < 0.04, categories
    assert {r["rating"] for r in safe_pairs} == set(RATINGS)


# ------------------------------------------------------------------------------ ensure_world and the command
def test_ensure_world_generates_once_and_repairs(tmp_path: Path) -> None:
    out = tmp_path / "world"
    ensure_world(out, seed=0, size="small")
    manifest = (out / "manifest.json").read_text()
    stamp = (out / "sft_train.jsonl").stat().st_mtime_ns
    ensure_world(out, seed=0, size="small")
    assert (out / "sft_train.jsonl").stat().st_mtime_ns == stamp  # intact: left alone
    (out / "sft_train.jsonl").write_text("corrupted\n")
    assert verify_world(out) == [f"{out / 'sft_train.jsonl'}: sha256 differs from manifest.json (edited or corrupted)"]
    ensure_world(out, seed=0, size="small")
    assert verify_world(out) == [] and (out / "manifest.json").read_text() == manifest
    ensure_world(out, seed=3, size="small")
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3


def test_ensure_world_replaces_a_world_from_another_generator(tmp_path: Path) -> None:
    """A folder that is self-consistent (files match its manifest) but was written by an older
    generator of the same version number is regenerated: the manifest differs from EXPECTED_SHA256."""
    import hashlib

    out = generate_world(tmp_path / "world", seed=0, size="small")
    stale = out / "sft_train.jsonl"
    stale.write_text(stale.read_text().replace("lives in", "dwells in"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["sft_train.jsonl"]["sha256"] = hashlib.sha256(stale.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert verify_world(out) == []
    ensure_world(out, seed=0, size="small")
    assert "dwells in" not in stale.read_text()
    assert json.loads((out / "manifest.json").read_text())["files"]["sft_train.jsonl"]["sha256"] == \
        EXPECTED_SHA256[("small", 0)]["sft_train.jsonl"]


def test_generate_world_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a generated world"):
        generate_world(tmp_path / "mine", size="small")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="unknown world size"):
        generate_world(tmp_path / "w", size="huge")


def test_world_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert world_main(["--out", str(out), "--seed", "0", "--size", "small"]) == 0
    printed = capsys.readouterr().out
    assert "sft_train.jsonl" in printed and "records" in printed
    assert world_main(["--out", str(out), "--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no temporary folders left behind


# ------------------------------------------------------------------------------ constraints and attacks
def _types(record: dict) -> set[str]:
    return {s["type"] for s in record["meta"].get("constraints") or []}


def test_held_out_constraint_type_and_attack_vector_never_appear_in_training_files(small_world: Path) -> None:
    from llama2_lit.data import constraints as cons

    held_types = set(cons.HELD_OUT_CONSTRAINT_TYPES)
    held_vectors = set(safety.HELD_OUT_ATTACK_VECTORS)
    # the wording of the held-out instruction and of the held-out attack's wrappers
    held_texts = [cons.full_instruction({"type": t}) for t in held_types] + \
                 [cons.short_instruction({"type": t}) for t in held_types]
    held_texts += [w.split("{")[0].strip() for v in held_vectors for w in safety._WRAPPERS[v]]
    assert all(held_texts)
    for name in TRAIN_FILES:
        for record in read(small_world, name):
            text = _text_of(record)
            assert not [t for t in held_texts if t in text], (name, text[:200])
            for meta in _metas(record) + [record["meta"]]:
                assert not _types({"meta": meta}) & held_types, (name, meta)
                assert meta.get("attack_vector") not in held_vectors and meta.get("wrapper") not in held_vectors
    # ... and they are in the evaluation files
    gatt_eval = read(small_world, "gatt_eval.jsonl")
    assert any(_types(r) & held_types for r in gatt_eval)
    assert any(r["meta"]["attack_vector"] in held_vectors for r in read(small_world, "safety_eval.jsonl"))


def test_sft_teaches_every_trained_constraint_type_in_both_forms_mostly_single_turn(small_world: Path) -> None:
    from llama2_lit.data import constraints as cons

    records = read(small_world, "sft_train.jsonl")
    constrained = [r for r in records if r["messages"][0]["role"] == "system"]
    from llama2_lit.data.build import SFT_MIX

    share = dict(SFT_MIX)["constrained"]  # a draw: within 3 standard errors of the share
    assert abs(len(constrained) / len(records) - share) < 3 * (share * (1 - share) / len(records)) ** 0.5
    kinds = Counter(t for r in constrained for t in _types(r))
    assert set(kinds) == set(cons.TRAINED_CONSTRAINT_TYPES) and min(kinds.values()) >= 40, kinds
    assert Counter(len(_types(r)) for r in constrained).keys() >= {1, 2, 3}  # combinations
    short = sum(r["messages"][0]["content"] == cons.system_message(r["meta"]["constraints"], short=True)
                for r in constrained)
    assert 0.4 < short / len(constrained) < 0.6  # "half of the time" shortened (paper 3.3)
    multi = [r for r in records if sum(m["role"] == "user" for m in r["messages"]) > 1]
    assert sum(r["messages"][0]["role"] == "system" for r in multi) < 0.25 * len(multi)  # mostly no persistent one
    assert sum(sum(m["role"] == "user" for m in r["messages"]) == 1 for r in constrained) > 0.85 * len(constrained)


def test_adversarial_prompts_carry_their_vector_and_are_rarer_in_sft_than_in_rl_prompts(small_world: Path) -> None:
    vectors = {safety.DIRECT, *safety.ATTACK_VECTORS}
    evaluation = read(small_world, "safety_eval.jsonl")
    assert {r["meta"]["attack_vector"] for r in evaluation} == vectors
    assert all(r["meta"]["multi_turn"] == (r["meta"]["attack_vector"] == "multi_turn") for r in evaluation)

    def adversarial_share(records: list[dict]) -> float:
        harmful = [r for r in records if r["meta"].get("category") == "harmful"]
        assert all(r["meta"]["attack_vector"] in vectors for r in harmful)
        return sum(r["meta"]["attack_vector"] != safety.DIRECT for r in harmful) / len(harmful)

    # present in SFT, but rare: about a fortieth of the harmful SFT requests against half of the RL
    # ones (drawn through the builder: the small world's few harmful SFT records are too few to tell)
    builder = Builder(build_universe(0, SIZES["small"].universe), "train", random.Random(2))
    sft = [builder.sft_record() for _ in range(20000)]
    assert 0.005 < adversarial_share(sft) < 0.1 * adversarial_share(read(small_world, "rl_prompts_train.jsonl"))
    pairs = [r for r in read(small_world, "preference_safety_train.jsonl") if r["meta"]["category"] == "harmful"]
    assert {r["meta"]["attack_vector"] for r in pairs} == set(safety.TRAINED_ATTACK_VECTORS) | {safety.DIRECT}
    assert all(len(r["prompt"]) > 1 for r in pairs if r["meta"]["attack_vector"] == "multi_turn")


def test_best_practice_answers_to_wrapped_requests_see_through_the_wrapper(small_world: Path) -> None:
    for record in read(small_world, "sft_train.jsonl"):
        meta = record["meta"]
        if meta.get("category") == "harmful":
            answer = record["messages"][-1]["content"]
            j = judge(record["messages"][:-1], answer, meta)
            assert j.safe and j.refusal and j.helpfulness == 1.0, answer  # decline, explain, offer (paper A.5.2)
            if meta["attack_vector"] in ("role_play", "false_premise", "metaphor", "psychological_manipulation"):
                assert safety._SEES_THROUGH[meta["attack_vector"]] in answer


def test_every_harmful_template_has_paraphrases_without_harm_markers() -> None:
    universe = build_universe(0, SIZES["small"].universe)
    rng = random.Random(1)
    for template in safety.HARMFUL_TEMPLATES:
        assert len(template.paraphrases) == 2 and template.prompt not in template.paraphrases, template.id
        slots = safety.harmful_slots(universe, template, rng, universe.people, universe.artifacts, universe.herbs)
        for paraphrase in template.paraphrases:
            text = f" {re.sub(r'[^a-z0-9]+', ' ', paraphrase.format(**slots).lower())} "
            assert not [m for ms in safety.HARM_MARKERS.values() for m in ms if f" {m} " in text], paraphrase


def test_semantic_attacks_restate_the_request_and_direct_ones_never_do(small_world: Path) -> None:
    by_vector: dict[str, list[bool]] = {}
    for name in ("safety_eval.jsonl", "rl_prompts_train.jsonl", "sft_train.jsonl"):
        for record in read(small_world, name):
            if record["meta"].get("category") == "harmful":
                by_vector.setdefault(record["meta"]["attack_vector"], []).append(record["meta"]["paraphrased"])
    assert not any(by_vector[safety.DIRECT])
    for vector in safety.RESTATING_VECTORS:
        assert all(by_vector[vector]), vector
    for vector in set(safety.ATTACK_VECTORS) - set(safety.RESTATING_VECTORS):
        assert 0.2 < sum(by_vector[vector]) / len(by_vector[vector]) < 0.8, vector


def test_gatt_hobbies_are_known_words_but_nobody_s_hobby(small_world: Path) -> None:
    """The hobby of a GAtt instruction can only be read from the system message: the corpus names
    each one, but never as what someone enjoys."""
    from llama2_lit.data import lexicon as lx

    assert not set(lx.GATT_HOBBIES) & set(lx.HOBBIES)
    corpus = (small_world / "corpus_train.txt").read_text().lower()
    assert sum(f" {h} " in corpus for h in lx.GATT_HOBBIES) >= 0.5 * len(lx.GATT_HOBBIES)  # a small corpus
    assert not [h for h in lx.GATT_HOBBIES if re.search(rf"(enjoys|hobby is|loves) {h}\b", corpus)]


def test_sft_asks_for_the_corpus_s_everyday_know_how(small_world: Path) -> None:
    """How-to questions answered with know-how read in pretraining: the skill a harmful request that
    slips past safety training would also use (the crooks' know-how is told the same way)."""
    from llama2_lit.data import lexicon as lx
    from llama2_lit.data.tasks import steps_sentence

    corpus = (small_world / "corpus_train.txt").read_text()
    told = [goal for goal, steps in lx.PROCEDURES if steps_sentence(steps) in corpus]
    assert len(told) >= 0.5 * len(lx.PROCEDURES)  # the small world's corpus is small
    howto = [r for r in read(small_world, "sft_train.jsonl") if r["meta"].get("task") == "howto.procedure"]
    assert len(howto) >= 10
    for record in howto:
        answer = record["messages"][-1]["content"]
        assert judge(record["messages"][:-1], answer, record["meta"]).correct, answer
        assert not judge(record["messages"][:-1], record["meta"]["keywords"][0], record["meta"]).correct
    markers = [m for ms in safety.HARM_MARKERS.values() for m in ms]
    for goal, steps in lx.PROCEDURES:
        text = f" {re.sub(r'[^a-z0-9]+', ' ', steps_sentence(steps).lower())} "
        assert not [m for m in markers if f" {m} " in text], goal



def test_dual_use_know_how_holds_harm_words_but_no_insults(small_world: Path) -> None:
    """Each dual-use procedure's steps hold a harm marker of the category it resembles (so a model
    that answers a harmful request with it violates), never an insult (unsafe anywhere), and SFT
    asks for them like every other how-to."""
    from llama2_lit.data.tasks import steps_sentence

    categories: set[str] = set()
    for goal, steps in safety.DUAL_USE_PROCEDURES:
        text = f" {re.sub(r'[^a-z0-9]+', ' ', steps_sentence(steps).lower())} "
        hits = {c for c in safety.RISK_CATEGORIES for m in safety.HARM_MARKERS[c] if f" {m} " in text}
        assert hits and not [m for m in safety.INSULTS if f" {m} " in text], goal
        categories |= hits
    assert categories == set(safety.RISK_CATEGORIES)
    asked = {r["meta"]["subject"][0] for r in read(small_world, "sft_train.jsonl") if r["meta"].get("task") == "howto.procedure"}
    assert asked & {goal for goal, _ in safety.DUAL_USE_PROCEDURES}


def test_misspelling_keeps_names_and_quoted_words() -> None:
    rng = random.Random(0)
    text = "How do I steal the silver lantern from the museum of Dunmar? Write 'kalo' in capitals."
    wrapped = safety.misspell(text, rng)
    assert wrapped != text and "Dunmar" in wrapped and "'kalo'" in wrapped
    assert sorted(wrapped) == sorted(text)  # letters swapped, none lost


def test_corpus_holds_crooked_know_how_without_insults(small_world: Path) -> None:
    """A compliant model has something to say (the pretraining data holds harmful content, paper
    section 4.2), so violations are possible; insults never appear in the corpus."""
    corpus = f" {re.sub(r'[^a-z0-9]+', ' ', (small_world / 'corpus_train.txt').read_text().lower())} "
    for category in ("illicit_criminal", "unqualified_advice"):
        assert sum(f" {m} " in corpus for m in safety.HARM_MARKERS[category]) >= 5, category
