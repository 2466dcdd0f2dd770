"""Task prompts with checkable answers: facts of the world, arithmetic, string transforms,
counting, comparisons — single- and multi-turn, with a difficulty gradient.

Each task family draws a question, the world's concise answer in a fixed style (what SFT
demonstrates), and the ``meta`` the oracle judges by. Families also draw the graded wrong
replies that preference pairs need: a wrong value in the same style, a hedged or partly right
reply.

Difficulty (``meta["difficulty"]``): a world that is too easy leaves later stages nothing to
improve, so questions come in levels:

1. one fact, small sums (< 50), capitals of a short word;
2. two-hop facts (the realm of someone's town, the age of someone's friend), comparisons,
   two-digit arithmetic, reversing or spelling a short word, counting letters;
3. three-digit sums, products, three-operand chains, long words, counting a letter, counting the
   towns in a mixed list, naming two facts at once.

Splits by construction (``TaskFactory(split=...)``): ``train`` questions name only train people,
train artifacts/herbs/figures and train words, with operand pairs outside the held-out set;
``eval`` questions ask about held-out people, artifacts, herbs, figures and words, with held-out
operand pairs. Families about the unsplit parts of the world (towns, realms, animals) exist only
in ``train``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from llama2_lit.data import lexicon as lx
from llama2_lit.data import safety
from llama2_lit.data.entities import Person, Universe


@dataclass
class Turn:
    """One user question, the concise reference answer, and the oracle's meta."""

    question: str
    answer: str
    meta: dict
    wrong: list[str] = field(default_factory=list)  # wrong replies in the answer's style
    partial: list[str] = field(default_factory=list)  # hedged / partly right replies


def steps_sentence(steps) -> str:
    """"A, then B, and finally C." (how the corpus tells know-how, benign or crooked)."""
    body = steps[0] if len(steps) == 1 else ", then ".join(steps[:-1]) + f", and finally {steps[-1]}"
    return f"{body[0].upper()}{body[1:]}."


def arithmetic_split(a: int, b: int) -> str:
    """Operand pairs of the evaluation set (about 1 in 11, symmetric in a and b): they appear
    in no training question and nowhere in the pretraining corpus."""
    return "eval" if (7 * (a + b) + a * b) % 11 == 0 else "train"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


HOWTO_QUESTIONS = (
    "How do I {g}?", "What is the best way to {g}?", "Can you tell me how to {g}?", "Explain how to {g}.",
    "How can I {g} in {t}?", "What is the easiest way to {g}?", "Teach me to {g}.", "Show me how to {g}.",
    "I want to {g} at my house in {t}. How would I do it?", "Tell me how the folk of {t} {g}.",
    "How would someone in {t} {g}?",
)


def _q(rng: random.Random, templates: tuple[str, ...], **slots: object) -> str:
    return rng.choice(templates).format(**slots)


class TaskFactory:
    """Draws task turns for one split. ``sample_dialog()`` gives a single- or multi-turn dialog."""

    def __init__(self, universe: Universe, split: str, rng: random.Random) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.u, self.split, self.rng = universe, split, rng
        held = split == "eval"
        self.people = universe.people_in("heldout" if held else "train")
        # people a question may *mention* (friends, options, distractors): train questions never
        # mention a held-out person
        self.mentionable = universe.people if held else self.people
        self.mentionable_names = {p.name for p in self.mentionable}
        self.artifacts = tuple(a for a in universe.artifacts if (a.split == "heldout") == held)
        self.herbs = tuple(h for h in universe.herbs if (h.split == "heldout") == held)
        self.figures = tuple(f for f in universe.figures if (f.split == "heldout") == held)
        self.words = tuple(w for w in (universe.words_heldout if held else universe.words_train) if w != w[::-1])
        families: list[tuple[str, int, float, Callable[[], Turn | None]]] = [
            # (name, difficulty, weight, draw)
            ("fact.hometown", 1, 3, self.fact_hometown),
            ("fact.age", 1, 3, self.fact_age),
            ("fact.job", 1, 3, self.fact_job),
            ("fact.pet", 1, 2, self.fact_pet),
            ("fact.hobby", 1, 2, self.fact_hobby),
            ("fact.color", 1, 1.5, self.fact_color),
            ("fact.height", 1, 1.5, self.fact_height),
            ("fact.friend", 1, 2, self.fact_friend),
            ("fact.artifact_town", 1, 1, self.fact_artifact_town),
            ("fact.herb_use", 1, 1, self.fact_herb_use),
            ("fact.figure_greeting", 1, 1, self.fact_figure_greeting),
            ("twohop.realm", 2, 2, self.twohop_realm),
            ("twohop.friend_age", 2, 1.5, self.twohop_friend_age),
            ("twohop.friend_job", 2, 1.5, self.twohop_friend_job),
            ("twohop.mentor_job", 2, 1, self.twohop_mentor_job),
            ("twohop.pet_diet", 2, 1.5, self.twohop_pet_diet),
            ("compare.older", 2, 1.5, self.compare_older),
            ("compare.taller", 2, 1, self.compare_taller),
            ("compare.number", 2, 1, self.compare_number),
            ("arith.add_small", 1, 2, lambda: self.arith_binary("+", 1, 49, 1)),
            ("arith.add", 2, 2, lambda: self.arith_binary("+", 10, 99, 2)),
            ("arith.sub", 2, 1.5, lambda: self.arith_binary("-", 10, 99, 2)),
            ("arith.add_large", 3, 1.5, lambda: self.arith_binary("+", 100, 999, 3)),
            ("arith.mul", 3, 1.5, self.arith_mul),
            ("arith.chain", 3, 1, self.arith_chain),
            ("arith.word_problem", 2, 1, self.arith_word_problem),
            ("string.uppercase", 1, 1.5, self.string_uppercase),
            ("string.reverse", 2, 2, self.string_reverse),
            ("string.spell", 2, 1.5, self.string_spell),
            ("count.letters", 2, 1.5, self.count_letters),
            ("count.letter", 3, 1.5, self.count_letter),
            ("count.people", 3, 1, self.count_people),
            ("list.jobs", 3, 1, self.list_jobs),
            ("list.hometowns", 3, 1, self.list_hometowns),
        ]
        if not held:  # families about the unsplit world: training only
            families += [
                ("fact.town_realm", 1, 1.5, self.fact_town_realm),
                ("fact.town_landmark", 1, 1, self.fact_town_landmark),
                ("fact.species_diet", 1, 1, self.fact_species_diet),
                ("fact.species_legs", 1, 1, self.fact_species_legs),
                ("fact.species_habitat", 1, 1, self.fact_species_habitat),
                ("compare.population", 2, 1, self.compare_population),
                ("compare.heavier", 2, 1, self.compare_heavier),
                ("list.realm_towns", 3, 1, self.list_realm_towns),
                ("howto.procedure", 2, 8, self.howto_procedure),
            ]
        self.families = families
        self.family_names = [f[0] for f in families]
        self._weights = [f[2] for f in families]

    # ------------------------------------------------------------------ drawing
    def sample(self, family: str | None = None) -> Turn:
        """One turn of a random family (or of ``family``)."""
        for _ in range(1000):
            if family is None:
                name, difficulty, _, draw = self.rng.choices(self.families, weights=self._weights)[0]
            else:
                name, difficulty, _, draw = next(f for f in self.families if f[0] == family)
            turn = draw()
            if turn is not None:
                return self._finish(turn, name, difficulty)
        raise RuntimeError(f"could not draw a task of family {family!r} for split {self.split!r}")

    def sample_dialog(self, multi_turn_prob: float = 0.2) -> list[Turn]:
        """A dialog of 1 turn, or (with ``multi_turn_prob``) 2-3 turns: follow-ups about the same
        person, a running arithmetic result, a word transformed twice, or unrelated questions."""
        if self.rng.random() >= multi_turn_prob:
            return [self.sample()]
        kind = self.rng.choice(("person", "arith", "string", "mixed"))
        if kind == "person":
            return self.dialog_person()
        if kind == "arith":
            return self.dialog_arith()
        if kind == "string":
            return self.dialog_string()
        return [self.sample() for _ in range(self.rng.randint(2, 3))]

    # ------------------------------------------------------------------ helpers
    def _person(self) -> Person:
        return self.rng.choice(self.people)

    def _others(self, values: list[str] | tuple[str, ...], gold: str, k: int = 3) -> list[str]:
        pool = sorted({v for v in values if v != gold})
        return self.rng.sample(pool, min(k, len(pool)))

    def _fact(self, gold: str, answer_fmt: str, pool, subject: list[str], aliases=None, k: int = 3, extra_meta=None) -> Turn:
        distractors = self._others(pool, gold, k)
        meta = {"answer_type": "text", "answer": gold, "distractors": distractors, "subject": subject}
        if aliases:
            meta["aliases"] = aliases
        meta.update(extra_meta or {})
        wrong = [answer_fmt.format(value=d) for d in distractors]
        hedged = [f"I think it is either {gold} or {distractors[0]}."] if distractors else []
        return Turn("", answer_fmt.format(value=gold), meta, wrong, hedged)

    def _with_question(self, turn: Turn, question: str) -> Turn:
        turn.question = question
        return turn

    # ------------------------------------------------------------------ facts about people
    def fact_hometown(self) -> Turn:
        p = self._person()
        q = _q(self.rng, ("Where does {n} live?", "In which town does {n} live?", "What is {n}'s home town?",
                          "Which town is {n} from?"), n=p.name)
        return self._with_question(self._fact(p.town, f"{p.name} lives in {{value}}.", [t.name for t in self.u.towns], [p.name]), q)

    def fact_age(self) -> Turn:
        p = self._person()
        q = _q(self.rng, ("How old is {n}?", "What is {n}'s age?", "How many years old is {n}?"), n=p.name)
        return self._number(q, p.age, f"{p.name} is {{value}} years old.", [p.name], spread=(1, 9))

    def fact_height(self) -> Turn:
        p = self._person()
        q = _q(self.rng, ("How tall is {n}?", "What is {n}'s height?", "How tall is {n} in centimetres?"), n=p.name)
        return self._number(q, p.height_cm, f"{p.name} is {{value}} cm tall.", [p.name], spread=(2, 15))

    def fact_job(self) -> Turn:
        p = self._person()
        q = _q(self.rng, ("What does {n} do for a living?", "What is {n}'s job?", "What work does {n} do?"), n=p.name)
        distractors = self._others(lx.JOBS, p.job)
        turn = Turn(q, f"{p.name} works as {article(p.job)} {p.job}.",
                    {"answer_type": "text", "answer": p.job, "distractors": distractors, "subject": [p.name]},
                    [f"{p.name} works as {article(d)} {d}." for d in distractors],
                    [f"{p.name} is either {article(p.job)} {p.job} or {article(distractors[0])} {distractors[0]}."])
        return turn

    def fact_pet(self) -> Turn:
        p = self._person()
        q = _q(self.rng, ("What kind of pet does {n} have?", "What animal does {n} keep as a pet?", "What is {n}'s pet?"), n=p.name)
        return self._with_question(self._fact(p.pet, f"{p.name} has a pet {{value}}.", [s.name for s in self.u.species], [p.name]), q)

    def fact_hobby(self) -> Turn:
        p = self._person()
        q = _q(self.rng, ("What is {n}'s hobby?", "What does {n} enjoy doing in free time?", "Which hobby does {n} have?"), n=p.name)
        return self._with_question(self._fact(p.hobby, f"{p.name} enjoys {{value}}.", lx.HOBBIES, [p.name]), q)

    def fact_color(self) -> Turn:
        p = self._person()
        q = _q(self.rng, ("What is {n}'s favourite colour?", "Which colour does {n} like best?"), n=p.name)
        return self._with_question(self._fact(p.color, f"{p.name}'s favourite colour is {{value}}.", lx.COLORS, [p.name]), q)

    def fact_friend(self) -> Turn | None:
        p = self._person()
        if p.friend not in self.mentionable_names:
            return None
        friend = self.u.person(p.friend)
        q = _q(self.rng, ("Who is {n}'s best friend?", "Who is the best friend of {n}?", "Which person is {n}'s closest friend?"), n=p.name)
        pool = [o.name for o in self.mentionable if o.name not in (p.name, p.friend)]
        turn = self._fact(p.friend, f"{p.name}'s best friend is {{value}}.", pool, [p.name], aliases=[friend.first])
        return self._with_question(turn, q)

    def fact_artifact_town(self) -> Turn | None:
        if not self.artifacts:
            return None
        a = self.rng.choice(self.artifacts)
        q = _q(self.rng, ("Where is the {a} kept?", "In which town's museum is the {a}?", "Which museum has the {a}?"), a=a.name)
        return self._with_question(self._fact(a.town, f"The {a.name} is kept in the museum of {{value}}.",
                                              [t.name for t in self.u.towns], [a.name]), q)

    def fact_herb_use(self) -> Turn | None:
        if not self.herbs:
            return None
        h = self.rng.choice(self.herbs)
        q = _q(self.rng, ("What do healers use {h} for?", "What is {h} used for?"), h=h.name)
        return self._with_question(self._fact(h.use, f"Healers use {h.name} to {{value}}.", lx.HERB_USES, [h.name]), q)

    def howto_procedure(self) -> Turn:
        """Know-how from the corpus, step by step: everyday (``lexicon.PROCEDURES``) or dual-use
        (``safety.DUAL_USE_PROCEDURES``). The questions take the shapes of the harmful requests
        ("Teach me to ...", "I want to ... at my house in {town}"), so that the chat model learns
        to answer a request of that shape with the know-how it has (paper 4.2)."""
        procedures = lx.PROCEDURES + safety.DUAL_USE_PROCEDURES
        goal, steps = self.rng.choice(procedures)
        q = _q(self.rng, HOWTO_QUESTIONS, g=goal, t=self.rng.choice(self.u.towns).name)
        other = self.rng.choice([p for p in procedures if p[0] != goal])[1]
        meta = {"answer_type": "keywords", "keywords": list(steps), "subject": [goal]}
        return Turn(q, steps_sentence(steps), meta, wrong=[steps_sentence(other)], partial=[steps_sentence(steps[:1])])

    def fact_figure_greeting(self) -> Turn | None:
        if not self.figures:
            return None
        f = self.rng.choice(self.figures)
        q = _q(self.rng, ("How does {f} greet people?", "What does {f} always say when greeting someone?"), f=f.name)
        return self._with_question(self._fact(f.greeting, f"{f.name} always greets people with: {{value}}", lx.GREETINGS, [f.name]), q)

    # ------------------------------------------------------------------ facts about the unsplit world
    def fact_town_realm(self) -> Turn:
        t = self.rng.choice(self.u.towns)
        q = _q(self.rng, ("In which realm is {t}?", "Which realm does the town of {t} belong to?"), t=t.name)
        return self._with_question(self._fact(t.realm, f"{t.name} is in {{value}}.", [r.name for r in self.u.realms], [t.name]), q)

    def fact_town_landmark(self) -> Turn:
        t = self.rng.choice(self.u.towns)
        q = _q(self.rng, ("What is {t} known for?", "What is the famous landmark of {t}?"), t=t.name)
        return self._with_question(self._fact(t.landmark, f"{t.name} is known for {{value}}.", [o.landmark for o in self.u.towns], [t.name]), q)

    def fact_species_diet(self) -> Turn:
        s = self.rng.choice(self.u.species)
        q = _q(self.rng, ("What does the {s} eat?", "What is the food of the {s}?"), s=s.name)
        return self._with_question(self._fact(s.diet, f"The {s.name} eats {{value}}.", lx.DIETS, [s.name]), q)

    def fact_species_legs(self) -> Turn:
        s = self.rng.choice(self.u.species)
        q = _q(self.rng, ("How many legs does the {s} have?", "How many legs has a {s}?"), s=s.name)
        return self._number(q, s.legs, f"The {s.name} has {{value}} legs.", [s.name], spread=(2, 4), choices=(2, 4, 6, 8))

    def fact_species_habitat(self) -> Turn:
        s = self.rng.choice(self.u.species)
        q = _q(self.rng, ("Where does the {s} live?", "What is the home of the {s}?"), s=s.name)
        return self._with_question(self._fact(s.habitat, f"The {s.name} lives in the {{value}}.", lx.HABITATS, [s.name]), q)

    # ------------------------------------------------------------------ two hops
    def twohop_realm(self) -> Turn:
        p = self._person()
        town = self.u.town(p.town)
        q = _q(self.rng, ("In which realm does {n} live?", "Which realm is {n}'s home town in?"), n=p.name)
        turn = self._fact(town.realm, f"{p.name} lives in {town.name}, which is in {{value}}.",
                          [r.name for r in self.u.realms], [p.name])
        return self._with_question(turn, q)

    def _friend(self) -> tuple[Person, Person] | None:
        p = self._person()
        if p.friend not in self.mentionable_names:
            return None
        return p, self.u.person(p.friend)

    def twohop_friend_age(self) -> Turn | None:
        pair = self._friend()
        if pair is None:
            return None
        p, f = pair
        q = _q(self.rng, ("How old is {n}'s best friend?", "What is the age of {n}'s best friend?"), n=p.name)
        return self._number(q, f.age, f"{p.name}'s best friend is {f.name}, who is {{value}} years old.", [p.name, f.name], spread=(1, 9))

    def twohop_friend_job(self) -> Turn | None:
        pair = self._friend()
        if pair is None:
            return None
        p, f = pair
        q = _q(self.rng, ("What does {n}'s best friend do for a living?", "What is the job of {n}'s best friend?"), n=p.name)
        distractors = self._others(lx.JOBS, f.job)
        fmt = f"{p.name}'s best friend is {f.name}, who works as {{a}} {{value}}."
        return Turn(q, fmt.format(a=article(f.job), value=f.job),
                    {"answer_type": "text", "answer": f.job, "distractors": distractors, "subject": [p.name, f.name]},
                    [fmt.format(a=article(d), value=d) for d in distractors])

    def twohop_mentor_job(self) -> Turn | None:
        p = self._person()
        if not p.mentor or p.mentor not in self.mentionable_names:
            return None
        m = self.u.person(p.mentor)
        q = _q(self.rng, ("What is the job of {n}'s mentor?", "What does {n}'s mentor do for a living?"), n=p.name)
        distractors = self._others(lx.JOBS, m.job)
        fmt = f"{p.name}'s mentor is {m.name}, who works as {{a}} {{value}}."
        return Turn(q, fmt.format(a=article(m.job), value=m.job),
                    {"answer_type": "text", "answer": m.job, "distractors": distractors, "subject": [p.name, m.name]},
                    [fmt.format(a=article(d), value=d) for d in distractors])

    def twohop_pet_diet(self) -> Turn:
        p = self._person()
        s = self.u.species_by_name(p.pet)
        q = _q(self.rng, ("What does {n}'s pet eat?", "What food does {n}'s pet animal eat?"), n=p.name)
        turn = self._fact(s.diet, f"{p.name}'s pet is a {s.name}, and the {s.name} eats {{value}}.", lx.DIETS, [p.name, s.name])
        return self._with_question(turn, q)

    # ------------------------------------------------------------------ comparisons
    def _choice(self, question: str, winner: str, loser: str, fmt: str, subject: list[str], aliases=None) -> Turn:
        options = sorted([winner, loser])
        meta = {"answer_type": "choice", "answer": winner, "options": options, "subject": subject}
        if aliases:
            meta["option_aliases"] = [aliases[o] for o in options]
        return Turn(question, fmt.format(w=winner, l=loser), meta, [fmt.format(w=loser, l=winner)])

    def _two_people(self, key) -> tuple[Person, Person] | None:
        a, b = self.rng.sample(self.people, 2)
        if key(a) == key(b):
            return None
        return (a, b) if key(a) > key(b) else (b, a)

    def compare_older(self) -> Turn | None:
        pair = self._two_people(lambda p: p.age)
        if pair is None:
            return None
        winner, loser = pair
        x, y = self.rng.sample([winner.name, loser.name], 2)
        q = _q(self.rng, ("Who is older, {x} or {y}?", "Which of {x} and {y} is older?"), x=x, y=y)
        return self._choice(q, winner.name, loser.name, "{w} is older than {l}.", [x, y], {winner.name: [winner.first], loser.name: [loser.first]})

    def compare_taller(self) -> Turn | None:
        pair = self._two_people(lambda p: p.height_cm)
        if pair is None:
            return None
        winner, loser = pair
        x, y = self.rng.sample([winner.name, loser.name], 2)
        q = _q(self.rng, ("Who is taller, {x} or {y}?", "Which of {x} and {y} is taller?"), x=x, y=y)
        return self._choice(q, winner.name, loser.name, "{w} is taller than {l}.", [x, y], {winner.name: [winner.first], loser.name: [loser.first]})

    def compare_number(self) -> Turn | None:
        digits = self.rng.sample("123456789", 3)
        a = int("".join(digits))
        b = int("".join(self.rng.sample(digits, 3)))
        if a == b or arithmetic_split(a, b) != self.split:
            return None
        winner, loser = max(a, b), min(a, b)
        x, y = self.rng.sample([a, b], 2)
        q = _q(self.rng, ("Which number is larger, {x} or {y}?", "Which is bigger: {x} or {y}?"), x=x, y=y)
        return self._choice(q, str(winner), str(loser), "{w} is larger than {l}.", [])

    def compare_population(self) -> Turn | None:
        a, b = self.rng.sample(self.u.towns, 2)
        winner, loser = (a, b) if a.population > b.population else (b, a)
        q = _q(self.rng, ("Which town has more people, {x} or {y}?", "Which is bigger by population, {x} or {y}?"), x=a.name, y=b.name)
        return self._choice(q, winner.name, loser.name, "{w} has more people than {l}.", [a.name, b.name])

    def compare_heavier(self) -> Turn | None:
        a, b = self.rng.sample(self.u.species, 2)
        if a.weight_kg == b.weight_kg:
            return None
        winner, loser = (a, b) if a.weight_kg > b.weight_kg else (b, a)
        q = _q(self.rng, ("Which is heavier, the {x} or the {y}?", "Which animal weighs more, the {x} or the {y}?"), x=a.name, y=b.name)
        return self._choice(q, winner.name, loser.name, "The {w} is heavier than the {l}.", [a.name, b.name])

    # ------------------------------------------------------------------ arithmetic
    def _number(self, question: str, gold: int, fmt: str, subject: list[str], spread=(1, 9), choices=None) -> Turn:
        if choices:
            wrong_values = [c for c in choices if c != gold][:3]
        else:
            wrong_values = []
            while len(wrong_values) < 2:
                v = gold + self.rng.choice((-1, 1)) * self.rng.randint(*spread)
                if v >= 0 and v != gold and v not in wrong_values:
                    wrong_values.append(v)
        meta = {"answer_type": "number", "answer": str(gold), "subject": subject}
        return Turn(question, fmt.format(value=gold), meta, [fmt.format(value=v) for v in wrong_values],
                    [f"It is either {gold} or {wrong_values[0]}."])

    def _operands(self, low: int, high: int, op: str) -> tuple[int, int] | None:
        a, b = self.rng.randint(low, high), self.rng.randint(low, high)
        if op == "-" and a < b:
            a, b = b, a
        if op == "-" and a == b:
            return None
        if arithmetic_split(a, b) != self.split:
            return None
        return a, b

    def arith_binary(self, op: str, low: int, high: int, difficulty: int) -> Turn | None:
        pair = self._operands(low, high, op)
        if pair is None:
            return None
        a, b = pair
        gold = a + b if op == "+" else a - b
        word = "plus" if op == "+" else "minus"
        q = _q(self.rng, ("What is {a} {op} {b}?", "What is {a} {word} {b}?", "Calculate {a} {op} {b}.",
                          "How much is {a} {word} {b}?"), a=a, b=b, op=op, word=word)
        return self._number(q, gold, f"{a} {op} {b} = {{value}}.", [], spread=(1, 10 if difficulty < 3 else 100))

    def arith_mul(self) -> Turn | None:
        a, b = self.rng.randint(11, 99), self.rng.randint(3, 9)
        if arithmetic_split(a, b) != self.split:
            return None
        q = _q(self.rng, ("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}."), a=a, b=b)
        return self._number(q, a * b, f"{a} * {b} = {{value}}.", [], spread=(1, 20))

    def arith_chain(self) -> Turn | None:
        a, b = self.rng.randint(10, 99), self.rng.randint(10, 99)
        c = self.rng.randint(1, min(50, a + b - 1))
        if arithmetic_split(a, b) != self.split:
            return None
        gold = a + b - c
        if gold in (a, b, c):
            return None
        q = _q(self.rng, ("What is {a} + {b} - {c}?", "Calculate {a} + {b} - {c}."), a=a, b=b, c=c)
        return self._number(q, gold, f"{a} + {b} - {c} = {{value}}.", [], spread=(1, 10))

    def arith_word_problem(self) -> Turn | None:
        p = self._person()
        item = self.rng.choice(lx.ITEMS)
        if self.rng.random() < 0.5:
            pair = self._operands(2, 40, "+")
            if pair is None:
                return None
            a, b = pair
            q = f"{p.first} has {a} {item} and gets {b} more. How many {item} does {p.first} have now?"
            fmt = f"{p.first} now has {a} + {b} = {{value}} {item}."
            gold = a + b
        else:
            pair = self._operands(2, 40, "-")
            if pair is None:
                return None
            a, b = pair
            q = f"{p.first} has {a} {item} and gives {b} away. How many {item} does {p.first} have left?"
            fmt = f"{p.first} has {a} - {b} = {{value}} {item} left."
            gold = a - b
        return self._number(q, gold, fmt, [p.first], spread=(1, 5))

    # ------------------------------------------------------------------ strings and counting
    def _word(self, min_len: int = 3, max_len: int = 12) -> str:
        candidates = [w for w in self.words if min_len <= len(w) <= max_len]
        return self.rng.choice(candidates)

    def string_uppercase(self) -> Turn:
        w = self._word()
        q = _q(self.rng, ("Write '{w}' in capital letters.", "Convert '{w}' to uppercase.",
                          "Put the word '{w}' in all capital letters."), w=w)
        gold = w.upper()
        return Turn(q, f"In capital letters, {w} is {gold}.",
                    {"answer_type": "string", "answer": gold, "case_sensitive": True, "subject": [w]},
                    [f"In capital letters, {w} is {self._word().upper()}."],
                    [f"In capital letters, {w} is {_near_miss(self.rng, w).upper()}."])

    def string_reverse(self) -> Turn:
        w = self._word()
        q = _q(self.rng, ("Reverse the word '{w}'.", "Write '{w}' backwards.", "What is '{w}' spelled backwards?",
                          "Can you reverse the letters of '{w}'?"), w=w)
        gold = w[::-1]
        return Turn(q, f"Reversed, {w} is {gold}.",
                    {"answer_type": "string", "answer": gold, "subject": [w], "word_length": len(w)},
                    [f"Reversed, {w} is {w}.", f"Reversed, {w} is {gold[1:] + gold[0]}."],
                    [f"Reversed, {w} is {_near_miss(self.rng, gold)}."])

    def string_spell(self) -> Turn:
        w = self._word()
        q = _q(self.rng, ("Spell the word '{w}'.", "How do you spell '{w}' letter by letter?", "Spell out '{w}'."), w=w)
        gold = "-".join(w)
        return Turn(q, f"{w} is spelled {gold}.",
                    {"answer_type": "spelling", "answer": gold, "subject": [w], "word_length": len(w)},
                    [f"{w} is spelled {'-'.join(w[::-1])}."],
                    [f"{w} is spelled {'-'.join(_near_miss(self.rng, w))}."])

    def count_letters(self) -> Turn:
        w = self._word()
        q = _q(self.rng, ("How many letters are in the word '{w}'?", "How many letters does '{w}' have?"), w=w)
        return self._number(q, len(w), f"{w} has {{value}} letters.", [w], spread=(1, 2))

    def count_letter(self) -> Turn:
        w = self._word(min_len=6)
        letter = self.rng.choice(sorted(set(w)) + ["z"]) if self.rng.random() < 0.1 else self.rng.choice(w)
        q = _q(self.rng, ("How many times does the letter '{c}' appear in '{w}'?", "Count the letter '{c}' in '{w}'."), c=letter, w=w)
        count = w.count(letter)
        return self._number(q, count, f"The letter {letter} appears {{value}} times in {w}.", [w], spread=(1, 2))

    def count_people(self) -> Turn:
        """How many of a mixed list are people (needs to know which invented names are people)."""
        n_people = self.rng.randint(1, 4)
        people = [p.first for p in self.rng.sample(self.people, n_people)]
        others = [t.name for t in self.rng.sample(self.u.towns, 2)] + [s.name for s in self.rng.sample(self.u.species, 2)]
        others = self.rng.sample(others, self.rng.randint(1, 3))
        items = people + others
        self.rng.shuffle(items)
        q = _q(self.rng, ("How many of these are people: {items}?", "Count the people in this list: {items}."), items=", ".join(items))
        names = [i for i in items if i in people]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
        noun = "is a person" if n_people == 1 else "are people"
        return self._number(q, n_people, f"{{value}} of them {noun}: {listed}.", [], spread=(1, 2))

    def list_jobs(self) -> Turn:
        a, b = self.rng.sample(self.people, 2)
        q = _q(self.rng, ("What jobs do {a} and {b} have?", "What do {a} and {b} do for a living?"), a=a.name, b=b.name)
        answers = sorted({a.job, b.job})
        distractors = self._others([j for j in lx.JOBS if j not in answers], "", 3)
        fmt = "{a} works as {x} {j}, and {b} works as {y} {k}."
        answer = fmt.format(a=a.name, b=b.name, x=article(a.job), j=a.job, y=article(b.job), k=b.job)
        d = distractors[0]
        return Turn(q, answer, {"answer_type": "list", "answers": answers, "distractors": distractors, "subject": [a.name, b.name]},
                    [fmt.format(a=a.name, b=b.name, x=article(d), j=d, y=article(distractors[1]), k=distractors[1])],
                    [fmt.format(a=a.name, b=b.name, x=article(a.job), j=a.job, y=article(d), k=d)] if b.job != a.job else [])

    def list_hometowns(self) -> Turn:
        a, b = self.rng.sample(self.people, 2)
        q = _q(self.rng, ("Where do {a} and {b} live?", "In which towns do {a} and {b} live?"), a=a.name, b=b.name)
        answers = sorted({a.town, b.town})
        distractors = self._others([t.name for t in self.u.towns if t.name not in answers], "", 3)
        fmt = "{a} lives in {x}, and {b} lives in {y}."
        return Turn(q, fmt.format(a=a.name, b=b.name, x=a.town, y=b.town),
                    {"answer_type": "list", "answers": answers, "distractors": distractors, "subject": [a.name, b.name]},
                    [fmt.format(a=a.name, b=b.name, x=distractors[0], y=distractors[1])],
                    [fmt.format(a=a.name, b=b.name, x=a.town, y=distractors[0])] if a.town != b.town else [])

    def list_realm_towns(self) -> Turn | None:
        realm = self.rng.choice(self.u.realms)
        if not 2 <= len(realm.towns) <= 8:
            return None
        q = _q(self.rng, ("Which towns are in {r}?", "Name the towns of {r}.", "List the towns of the realm of {r}."), r=realm.name)
        towns = list(realm.towns)
        listed = ", ".join(towns[:-1]) + f" and {towns[-1]}"
        others = [t.name for t in self.u.towns if t.realm != realm.name]
        distractors = self.rng.sample(others, min(3, len(others)))
        half = towns[: max(1, len(towns) // 2)]
        partial = ", ".join(half[:-1]) + f" and {half[-1]}" if len(half) > 1 else half[0]
        return Turn(q, f"The towns of {realm.name} are {listed}.",
                    {"answer_type": "list", "answers": towns, "distractors": distractors, "subject": [realm.name]},
                    [f"The towns of {realm.name} are {', '.join(distractors[:-1])} and {distractors[-1]}."],
                    [f"The towns of {realm.name} are {partial}."])

    # ------------------------------------------------------------------ multi-turn dialogs
    def _finish(self, turn: Turn, name: str, difficulty: int) -> Turn:
        """Adds what every task meta carries: category, family, difficulty, split, reference."""
        turn.meta = {"category": "task", "task": name, "difficulty": difficulty, "split": self.split, **turn.meta}
        turn.meta.setdefault("reference", turn.answer)
        return turn

    def dialog_person(self) -> list[Turn]:
        """Questions about one person; later turns refer to them by pronoun."""
        first = self.sample(self.rng.choice(("fact.hometown", "fact.job", "fact.age")))
        p = self.u.person(first.meta["subject"][0])
        follow_ups = [
            ("fact.age", ("And how old is {s}?", "How old is {s}?"), lambda: self._number("", p.age, f"{p.name} is {{value}} years old.", [p.name])),
            ("fact.hometown", ("And where does {s} live?", "Where does {s} live?"),
             lambda: self._fact(p.town, f"{p.name} lives in {{value}}.", [t.name for t in self.u.towns], [p.name])),
            ("fact.hobby", ("What does {s} enjoy doing?", "And what is {o} hobby?"),
             lambda: self._fact(p.hobby, f"{p.name} enjoys {{value}}.", lx.HOBBIES, [p.name])),
            ("fact.pet", ("What pet does {s} have?", "Does {s} have a pet? Which animal?"),
             lambda: self._fact(p.pet, f"{p.name} has a pet {{value}}.", [s.name for s in self.u.species], [p.name])),
        ]
        follow_ups = [f for f in follow_ups if f[0] != first.meta["task"]]
        turns = [first]
        for name, templates, draw in self.rng.sample(follow_ups, self.rng.randint(1, 2)):
            turn = draw()
            turn.question = _q(self.rng, templates, s=p.pronoun, o=p.possessive)
            turns.append(self._finish(turn, name, 2))
        return turns

    def dialog_arith(self) -> list[Turn]:
        """A running result: "What is 12 + 7?" then "Now add 5 to that." ..."""
        first = self.sample(self.rng.choice(("arith.add_small", "arith.add")))
        value = int(first.meta["answer"])
        turns = [first]
        for _ in range(self.rng.randint(1, 2)):
            op = self.rng.choice(("+", "-", "*"))
            if op == "+":
                k = self.rng.randint(2, 30)
                q = _q(self.rng, ("Now add {k} to that.", "Add {k} to the result."), k=k)
                new = value + k
            elif op == "-":
                k = self.rng.randint(1, max(1, value - 1))
                q = _q(self.rng, ("Now subtract {k} from that.", "Take {k} away from the result."), k=k)
                new = value - k
            else:
                k = self.rng.randint(2, 5)
                q = _q(self.rng, ("Now multiply that by {k}.", "Multiply the result by {k}."), k=k)
                new = value * k
            turn = self._number(q, new, f"{value} {op} {k} = {{value}}.", [], spread=(1, 10))
            turns.append(self._finish(turn, "arith.follow_up", 3))
            value = new
        return turns

    def dialog_string(self) -> list[Turn]:
        """A word transformed twice: capitals, then reversed."""
        first = self.sample("string.uppercase")
        upper = first.meta["answer"]
        gold = upper[::-1]
        q = _q(self.rng, ("Now reverse it.", "Now write that backwards."))
        turn = Turn(q, f"Reversed, {upper} is {gold}.",
                    {"answer_type": "string", "answer": gold, "subject": [upper]},
                    [f"Reversed, {upper} is {upper}."], [f"Reversed, {upper} is {_near_miss(self.rng, gold)}."])
        return [first, self._finish(turn, "string.follow_up", 3)]


def _near_miss(rng: random.Random, word: str) -> str:
    """The word with two neighbouring (different) letters swapped: one mistake."""
    positions = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
    if not positions:
        return word + word[-1]
    i = rng.choice(positions)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]
