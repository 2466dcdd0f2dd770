"""The entities of the toy world — people, towns, realms, animals, artifacts, herbs, famous
figures, heists — and how they are drawn from a seed.

``build_universe(seed, sizes)`` is a pure function of its arguments: one ``random.Random(seed)``
drives every choice, lists are drawn in a fixed order, and nothing iterates over a set or
depends on ``hash()``, so the same seed gives the same universe on every machine and Python.

Splits are decided here, once, by construction:

- people: ``train`` people are the subjects of every SFT / preference / RL / GAtt question;
  ``heldout`` people appear only in the pretraining corpus (in prose) and in evaluation
  questions. (After Allen-Zhu and Li, "Physics of Language Models: Part 3.1", arXiv 2309.14316: a model that read "Kalo lives in Dunmar" only in prose and still answers
  "Where does Kalo live?" has *extracted* knowledge, thanks to paraphrases.)
- figures (personas for Ghost Attention), artifacts and herbs (targets of harmful requests),
  string-task words: a held-out share is used only by the evaluation files.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from llama2_lit.data import lexicon as lx


@dataclass(frozen=True)
class Person:
    name: str  # "Kalo Brimwick"
    first: str
    family: str
    pronoun: str  # "she" | "he"
    town: str
    age: int
    height_cm: int
    job: str
    pet: str  # a species name
    hobby: str
    color: str
    friend: str = ""  # full name of the best friend (symmetric)
    mentor: str = ""  # full name of an older person who taught them
    split: str = "train"  # "train" | "heldout"

    @property
    def possessive(self) -> str:
        return "her" if self.pronoun == "she" else "his"

    @property
    def object_pronoun(self) -> str:
        return "her" if self.pronoun == "she" else "him"


@dataclass(frozen=True)
class Town:
    name: str
    realm: str
    population: int
    landmark: str
    export: str


@dataclass(frozen=True)
class Realm:
    name: str
    towns: tuple[str, ...]
    custom: str  # a festival, for respectful "customs" text


@dataclass(frozen=True)
class Species:
    name: str
    color: str
    diet: str
    legs: int
    habitat: str
    weight_kg: int
    sound: str


@dataclass(frozen=True)
class Artifact:
    name: str  # "silver lantern" (used as "the silver lantern")
    town: str  # kept in the museum of this town
    material: str
    age_years: int
    split: str = "train"


@dataclass(frozen=True)
class Herb:
    name: str  # "moonleaf"
    use: str  # "calm a cough"
    town: str  # grows near
    split: str = "train"


@dataclass(frozen=True)
class Figure:
    """A famous person of the world's history: a persona for Ghost Attention ("Act as ...")."""

    name: str  # "Queen Velmora"
    greeting: str  # "By the silver moon!"
    realm: str
    deed: str
    split: str = "train"


@dataclass(frozen=True)
class Heist:
    town: str
    artifact: str
    thief: str
    year: int


@dataclass(frozen=True)
class Universe:
    seed: int
    people: tuple[Person, ...]
    towns: tuple[Town, ...]
    realms: tuple[Realm, ...]
    species: tuple[Species, ...]
    artifacts: tuple[Artifact, ...]
    herbs: tuple[Herb, ...]
    figures: tuple[Figure, ...]
    heists: tuple[Heist, ...]
    words_train: tuple[str, ...]  # words of the string tasks (reverse, spell, count letters)
    words_heldout: tuple[str, ...]
    _index: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        index = self._index
        index["person"] = {p.name: p for p in self.people}
        index["town"] = {t.name: t for t in self.towns}
        index["realm"] = {r.name: r for r in self.realms}
        index["species"] = {s.name: s for s in self.species}

    def person(self, name: str) -> Person:
        return self._index["person"][name]

    def town(self, name: str) -> Town:
        return self._index["town"][name]

    def realm(self, name: str) -> Realm:
        return self._index["realm"][name]

    def species_by_name(self, name: str) -> Species:
        return self._index["species"][name]

    def people_in(self, split: str) -> tuple[Person, ...]:
        return tuple(p for p in self.people if p.split == split)

    def residents(self, town: str) -> tuple[Person, ...]:
        return tuple(p for p in self.people if p.town == town)

    def to_dict(self) -> dict[str, Any]:
        """The tables, for ``world.json`` (notebooks, evaluation reports)."""
        return {
            "seed": self.seed,
            "people": [asdict(p) for p in self.people],
            "towns": [asdict(t) for t in self.towns],
            "realms": [asdict(r) for r in self.realms],
            "species": [asdict(s) for s in self.species],
            "artifacts": [asdict(a) for a in self.artifacts],
            "herbs": [asdict(h) for h in self.herbs],
            "figures": [asdict(f) for f in self.figures],
            "heists": [asdict(h) for h in self.heists],
            "words_train": list(self.words_train),
            "words_heldout": list(self.words_heldout),
        }


@dataclass(frozen=True)
class UniverseSize:
    people: int
    towns: int
    realms: int
    species: int
    artifacts: int
    herbs: int
    figures: int
    invented_words: int  # invented words for string tasks (plus the English list)
    heldout_fraction: float = 0.2


def _heldout_flags(n: int, fraction: float, rng: random.Random) -> list[bool]:
    """Exactly round(n * fraction) (at least 1) positions are held out, chosen at random."""
    k = max(1, round(n * fraction))
    chosen = set(rng.sample(range(n), k))
    return [i in chosen for i in range(n)]


def build_universe(seed: int, size: UniverseSize) -> Universe:
    rng = random.Random(seed)
    names = lx.NameMaker(rng)

    # realms and towns
    realm_names = [names.name((1, 2), lx.REALM_SUFFIXES, max_len=9) for _ in range(size.realms)]
    landmarks = rng.sample(lx.LANDMARKS, size.towns)
    towns: list[Town] = []
    for i in range(size.towns):
        towns.append(Town(
            name=names.name((1, 2), lx.TOWN_SUFFIXES, max_len=10),
            realm=realm_names[i % size.realms],
            population=rng.randrange(200, 60_000),
            landmark=landmarks[i],
            export=rng.choice(lx.EXPORTS),
        ))
    festivals = ["the Festival of " + names.name((2, 2), max_len=8) for _ in range(size.realms)]
    realms = tuple(
        Realm(name=r, towns=tuple(t.name for t in towns if t.realm == r), custom=festivals[i])
        for i, r in enumerate(realm_names)
    )

    species = tuple(
        Species(
            name=names.word((1, 2), lx.SPECIES_SUFFIXES, max_len=9),
            color=rng.choice(lx.COLORS),
            diet=rng.choice(lx.DIETS),
            legs=rng.choice((2, 4, 4, 6, 8)),
            habitat=rng.choice(lx.HABITATS),
            weight_kg=rng.randrange(1, 400),
            sound=rng.choice(lx.SOUNDS),
        )
        for _ in range(size.species)
    )

    # people: unique first names, family names shared by a few people
    n_families = max(2, size.people // 3)
    families = [names.name((1, 2), lx.FAMILY_SUFFIXES, max_len=8) for _ in range(n_families)]
    heldout = _heldout_flags(size.people, size.heldout_fraction, rng)
    drafts: list[dict[str, Any]] = []
    for i in range(size.people):
        first = names.name((2, 2), max_len=7)
        family = families[rng.randrange(n_families)]
        drafts.append(dict(
            name=f"{first} {family}", first=first, family=family,
            pronoun=rng.choice(("she", "he")),
            town=rng.choice(towns).name,
            age=rng.randrange(18, 81),
            height_cm=rng.randrange(140, 206),
            job=rng.choice(lx.JOBS),
            pet=rng.choice(species).name,
            hobby=rng.choice(lx.HOBBIES),
            color=rng.choice(lx.COLORS),
            split="heldout" if heldout[i] else "train",
        ))
    # best friends: a random pairing (symmetric); with an odd count, one trio shares a friend
    order = list(range(size.people))
    rng.shuffle(order)
    for a, b in zip(order[0::2], order[1::2]):
        drafts[a]["friend"], drafts[b]["friend"] = drafts[b]["name"], drafts[a]["name"]
    if size.people % 2:
        drafts[order[-1]]["friend"] = drafts[order[0]]["name"]
    # mentors: someone at least 10 years older (the oldest people have none)
    for d in drafts:
        elders = [e["name"] for e in drafts if e["age"] >= d["age"] + 10]
        d["mentor"] = rng.choice(elders) if elders else ""
    people = tuple(Person(**d) for d in drafts)

    # artifacts (museum pieces) and heists
    pairs = [(a, n) for a in lx.ARTIFACT_ADJECTIVES for n in lx.ARTIFACT_NOUNS]
    chosen_pairs = rng.sample(pairs, size.artifacts)
    art_heldout = _heldout_flags(size.artifacts, 0.25, rng)
    artifacts = tuple(
        Artifact(
            name=f"{a} {n}",
            town=rng.choice(towns).name,
            material=a if a in lx.MATERIALS else rng.choice(lx.MATERIALS),
            age_years=rng.randrange(50, 900),
            split="heldout" if art_heldout[i] else "train",
        )
        for i, (a, n) in enumerate(chosen_pairs)
    )
    # heists: told in the corpus and in borderline prompts, so only about training artifacts
    train_artifacts = [a for a in artifacts if a.split == "train"]
    heist_artifacts = rng.sample(train_artifacts, max(2, size.artifacts // 4))
    heists = tuple(
        Heist(town=a.town, artifact=a.name, thief=f"{names.name((2, 2), max_len=7)} the {rng.choice(('Quiet', 'Quick', 'Sly', 'Grey', 'Nimble'))}",
              year=rng.randrange(100, 990))
        for a in heist_artifacts
    )

    herb_pairs = rng.sample([a + b for a in lx.HERB_FIRST for b in lx.HERB_SECOND], size.herbs)
    herb_heldout = _heldout_flags(size.herbs, 0.25, rng)
    herbs = tuple(
        Herb(name=h, use=rng.choice(lx.HERB_USES), town=rng.choice(towns).name,
             split="heldout" if herb_heldout[i] else "train")
        for i, h in enumerate(herb_pairs)
    )

    greetings = rng.sample(lx.GREETINGS, size.figures)
    fig_heldout = _heldout_flags(size.figures, 0.25, rng)
    deeds = (
        "sailed around the whole coast", "built the first bridge over the river", "wrote the great book of songs",
        "mapped the northern mountains", "ended the long winter war", "founded the first library",
        "discovered the hidden spring", "taught the realm to read", "won the great boat race",
        "planted the oldest orchard",
    )
    figures = tuple(
        Figure(name=f"{rng.choice(lx.TITLES)} {names.name((2, 3), max_len=9)}", greeting=greetings[i],
               realm=rng.choice(realm_names), deed=rng.choice(deeds),
               split="heldout" if fig_heldout[i] else "train")
        for i in range(size.figures)
    )

    invented = [names.word((2, 4), max_len=11) for _ in range(size.invented_words)]
    pool = list(lx.ENGLISH_WORDS) + invented
    word_heldout = _heldout_flags(len(pool), size.heldout_fraction, rng)
    words_train = tuple(w for w, h in zip(pool, word_heldout) if not h)
    words_heldout = tuple(w for w, h in zip(pool, word_heldout) if h)

    return Universe(
        seed=seed, people=people, towns=tuple(towns), realms=realms, species=species,
        artifacts=artifacts, herbs=herbs, figures=figures, heists=heists,
        words_train=words_train, words_heldout=words_heldout,
    )
