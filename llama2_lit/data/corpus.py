"""The pretraining corpus: encyclopedic entries, short stories, lists, arithmetic, word facts and
dialog-like prose about the world — one document per line, no chat format.

Knowledge must be *extractable* (Allen-Zhu and Li, arXiv 2309.14316): every fact is written in 3-4 paraphrases, drawn at
random each time it is stated, so a model learns the fact rather than one sentence. Held-out
people are described like everyone else (in bios, stories and lists) but never in question-and-
answer form, and the held-out arithmetic pairs and string-task words never appear: the evaluation
files then measure knowledge extraction and generalisation, not recall of a seen question.

The chat format (``[INST]``, ``<<SYS>>``) and refusals never appear: SFT teaches them.

Like real web text, the corpus also holds some harmful know-how (``lore_doc``: the crooked
"advice" behind the harmful requests of ``safety.HARMFUL_TEMPLATES``, insults excepted; half of
it as a forum-style exchange, the request plainly put or in an attack's wrapper). A
pretrained model therefore *can* comply with a harmful request — the reason safety tuning is
needed at all (paper section 4.2) — and an attack that slips past the SFT model's refusals shows
up as a violation the oracle can count.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

from llama2_lit.data import lexicon as lx
from llama2_lit.data import safety
from llama2_lit.data.entities import Person, Universe
from llama2_lit.data.tasks import arithmetic_split, article, steps_sentence


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


class CorpusWriter:
    """Draws documents. ``documents(n_words)`` yields them until about ``n_words`` words."""

    def __init__(self, universe: Universe, rng: random.Random) -> None:
        self.u, self.rng = universe, rng
        self.train_people = universe.people_in("train")
        self.kinds: list[tuple[Callable[[], str], float]] = [
            (self.person_bio, 30), (self.story, 18), (self.town_entry, 6), (self.realm_entry, 2),
            (self.species_entry, 5), (self.artifact_entry, 3), (self.heist_story, 1.5), (self.herb_entry, 2),
            (self.figure_entry, 2), (self.list_doc, 5), (self.arithmetic_doc, 13), (self.word_doc, 6),
            (self.interview, 6), (self.howto_doc, 1.5), (self.lore_doc, 4), (self.procedure_doc, 3),
            (self.pastime_doc, 3),
        ]
        self._draws = [k for k, _ in self.kinds]
        self._weights = [w for _, w in self.kinds]

    def documents(self, n_words: int) -> Iterator[str]:
        total = 0
        while total < n_words:
            doc = self.rng.choices(self._draws, weights=self._weights)[0]()
            total += len(doc.split())
            yield doc

    # ------------------------------------------------------------------ people
    def _subject(self, p: Person, first_mention: bool) -> str:
        if first_mention:
            return p.name
        r = self.rng.random()
        return p.name if r < 0.5 else p.first if r < 0.8 else _cap(p.pronoun)

    def person_fact(self, p: Person, fact: str, s: str) -> str:
        """One fact about ``p`` in a random paraphrase; ``s`` is how the sentence names them."""
        n, pos = p.name, p.possessive
        c = self.rng.choice
        if fact == "town":
            return c((f"{s} lives in {p.town}.", f"{s} makes {pos} home in {p.town}.", f"{s} is a resident of {p.town}.",
                      f"{p.town} is the home town of {n}."))
        if fact == "age":
            return c((f"{s} is {p.age} years old.", f"{s} turned {p.age} this year.", f"{n}'s age is {p.age}."))
        if fact == "job":
            a = article(p.job)
            return c((f"{s} works as {a} {p.job}.", f"{s} is {a} {p.job} by trade.", f"{s} earns a living as {a} {p.job}.",
                      f"By trade, {n} is {a} {p.job}."))
        if fact == "pet":
            return c((f"{s} has a pet {p.pet}.", f"{s} keeps a {p.pet} as a pet.", f"{n}'s pet is a {p.pet}."))
        if fact == "hobby":
            return c((f"{s} enjoys {p.hobby}.", f"In {pos} free time, {n} likes {p.hobby}.", f"{n}'s favourite hobby is {p.hobby}."))
        if fact == "color":
            return c((f"{n}'s favourite colour is {p.color}.", f"{s} likes the colour {p.color} best.",
                      f"Of all colours, {n} loves {p.color} the most."))
        if fact == "height":
            return c((f"{s} is {p.height_cm} cm tall.", f"{s} stands {p.height_cm} centimetres tall.", f"{n}'s height is {p.height_cm} cm."))
        if fact == "friend":
            return c((f"{n}'s best friend is {p.friend}.", f"{s} and {p.friend} are best friends.",
                      f"{s} spends a lot of time with {pos} best friend, {p.friend}."))
        if fact == "mentor":
            return c((f"{n}'s mentor is {p.mentor}.", f"{s} learned a lot from {pos} mentor, {p.mentor}.",
                      f"{p.mentor} was the mentor of {n}."))
        raise ValueError(fact)

    def person_bio(self) -> str:
        p = self.rng.choice(self.u.people)
        facts = ["town", "age", "job", "pet", "hobby", "color", "height", "friend"] + (["mentor"] if p.mentor else [])
        chosen = self.rng.sample(facts, self.rng.randint(4, len(facts)))
        sentences = [self.person_fact(p, f, self._subject(p, i == 0)) for i, f in enumerate(chosen)]
        return " ".join(sentences)

    def story(self) -> str:
        p = self.rng.choice(self.u.people)
        f = self.u.person(p.friend)
        kind = self.rng.randrange(5)
        if kind == 0:
            return (f"One morning, {p.name} left {p.town} to visit {p.possessive} best friend {f.name} in {f.town}. "
                    f"{f.first}, who works as {article(f.job)} {f.job}, was happy to see {p.first}. "
                    f"They talked about {p.first}'s pet {p.pet} and about {f.hobby}, which {f.first} enjoys. "
                    f"In the evening, {p.first} walked back home to {p.town}.")
        if kind == 1:
            town = self.u.town(p.town)
            older, younger = (p, f) if p.age > f.age else (f, p)
            tail = (f"{older.first} is the older of the two." if p.age != f.age else "They are the same age.")
            return (f"{p.name} and {f.name} met at {town.landmark} in {town.name}. {p.first} is {p.age} years old and "
                    f"{f.first} is {f.age}. {tail} {p.first} told {f.first} about {p.possessive} work as {article(p.job)} "
                    f"{p.job}, and {f.first} said that {f.pronoun} likes the colour {f.color} best.")
        if kind == 2:
            k = self.rng.randint(3, 40)
            item = self.rng.choice(lx.ITEMS)
            return (f"At the market of {p.town}, {p.name}, {article(p.job)} {p.job}, sold {k} {item}. "
                    f"{_cap(p.pronoun)} was {p.age} years old that summer. After the market closed, {p.first} fed "
                    f"{p.possessive} pet {p.pet} and spent the evening {p.hobby if p.hobby.endswith('ing') else 'on ' + p.hobby}.")
        if kind == 3:
            realm = self.u.realm(self.u.town(p.town).realm)
            return (f"During {realm.custom}, the people of {realm.name} sing and share bread. This year {p.name} from "
                    f"{p.town} went with {p.possessive} best friend {f.name}. {f.first} is {f.height_cm} cm tall, so "
                    f"{f.pronoun} could see the whole square. {p.first} is {p.height_cm} cm tall.")
        if not p.mentor:
            return self.person_bio()
        m = self.u.person(p.mentor)
        return (f"When {p.first} was young, {m.name} was {p.possessive} mentor. {m.first}, {article(m.job)} {m.job} from "
                f"{m.town}, taught {p.name} to be patient. Today {p.first} is {p.age} and works as {article(p.job)} "
                f"{p.job} in {p.town}, and {m.first} is {m.age}.")

    def interview(self) -> str:
        """Question-and-answer prose about *train* people only (held-out people are never asked)."""
        p = self.rng.choice(self.train_people)
        qa = [
            ("Where do you live?", f"I live in {p.town}."),
            ("What do you do?", f"I am {article(p.job)} {p.job}."),
            ("How old are you?", f"I am {p.age} years old."),
            ("Do you have a pet?", f"Yes, I have a {p.pet}."),
            ("What do you enjoy?", f"I enjoy {p.hobby}."),
            ("Who is your best friend?", f"My best friend is {p.friend}."),
            ("What is your favourite colour?", f"My favourite colour is {p.color}."),
        ]
        chosen = self.rng.sample(qa, self.rng.randint(2, 4))
        lines = [f"A traveller met {p.name} on the road."]
        for q, a in chosen:
            lines.append(self.rng.choice((f'"{q}" asked the traveller. "{a}" said {p.first}.',
                                          f'The traveller asked, "{q}" and {p.first} answered, "{a}"')))
        return " ".join(lines)

    # ------------------------------------------------------------------ places, animals, things
    def town_entry(self) -> str:
        t = self.rng.choice(self.u.towns)
        c = self.rng.choice
        sentences = [
            c((f"{t.name} is a town in {t.realm}.", f"The town of {t.name} lies in the realm of {t.realm}.",
               f"{t.name} belongs to the realm of {t.realm}.")),
            c((f"About {t.population} people live in {t.name}.", f"{t.name} has {t.population} people.",
               f"The population of {t.name} is {t.population}.")),
            c((f"{t.name} is known for {t.landmark}.", f"The famous landmark of {t.name} is {t.landmark}.",
               f"Visitors to {t.name} come to see {t.landmark}.")),
            c((f"The merchants of {t.name} sell {t.export}.", f"{t.name} is famous for its {t.export}.")),
        ]
        residents = [p.name for p in self.u.residents(t.name)]
        if residents:
            shown = self.rng.sample(residents, min(3, len(residents)))
            sentences.append(f"{_join(shown)} live{'s' if len(shown) == 1 else ''} in {t.name}.")
        self.rng.shuffle(sentences[1:])
        return " ".join(sentences)

    def realm_entry(self) -> str:
        r = self.rng.choice(self.u.realms)
        return (f"{r.name} is a realm with {len(r.towns)} towns: {_join(list(r.towns))}. "
                f"Every year the people of {r.name} celebrate {r.custom} with music, lanterns and fresh bread. "
                f"Travellers say the people of {r.name} are welcoming and proud of their towns.")

    def species_entry(self) -> str:
        s = self.rng.choice(self.u.species)
        c = self.rng.choice
        sentences = [
            c((f"The {s.name} is {article(s.color)} {s.color} animal that lives in the {s.habitat}.",
               f"The {s.name} is {s.color} and makes its home in the {s.habitat}.")),
            c((f"It has {s.legs} legs.", f"A {s.name} has {s.legs} legs.", f"The {s.name} walks on {s.legs} legs.")),
            c((f"The {s.name} eats {s.diet}.", f"Its food is {s.diet}.", f"A {s.name} feeds on {s.diet}.")),
            c((f"A grown {s.name} weighs about {s.weight_kg} kg.", f"The {s.name} weighs {s.weight_kg} kg.")),
            f"The {s.name} {s.sound} at dawn.",
        ]
        return " ".join(sentences)

    def artifact_entry(self) -> str:
        a = self.rng.choice(self.u.artifacts)
        c = self.rng.choice
        return " ".join([
            c((f"The {a.name} is kept in the museum of {a.town}.", f"The museum of {a.town} keeps the {a.name}.",
               f"Visitors can see the {a.name} in the museum of {a.town}.")),
            c((f"It is made of {a.material}.", f"The {a.name} is made of {a.material}.")),
            c((f"It is {a.age_years} years old.", f"The {a.name} was made {a.age_years} years ago.")),
        ])

    def heist_story(self) -> str:
        h = self.rng.choice(self.u.heists)
        return (f"The {h.town} heist: in the year {h.year}, {h.thief} stole the {h.artifact} from the museum of {h.town}. "
                f"The guards of {h.town} followed the tracks and caught the thief the next morning. The {h.artifact} "
                f"went back to the museum, and {h.thief.split()[0]} spent ten years in prison.")

    def herb_entry(self) -> str:
        h = self.rng.choice(self.u.herbs)
        return (f"{_cap(h.name)} grows near {h.town}. "
                + self.rng.choice((f"Healers use {h.name} to {h.use}.", f"Healers of {h.town} use {h.name} to {h.use}."))
                + f" Only a healer should decide how much {h.name} a person takes.")

    def figure_entry(self) -> str:
        f = self.rng.choice(self.u.figures)
        greet = self.rng.choice((f"{f.name} always greeted people with: {f.greeting}",
                                 f"The famous greeting of {f.name} is: {f.greeting}",
                                 f"Whenever {f.name} met someone, the first words were: {f.greeting}"))
        return f"{f.name} of {f.realm} {f.deed}. {greet} Songs about {f.name} are still sung in {f.realm}."

    def list_doc(self) -> str:
        kind = self.rng.randrange(4)
        if kind == 0:
            job = self.rng.choice(lx.JOBS)
            names = [p.name for p in self.u.people if p.job == job]
            if not names:
                return self.realm_entry()
            return f"People who work as {job}s: {_join(self.rng.sample(names, min(6, len(names))))}."
        if kind == 1:
            habitat = self.rng.choice(lx.HABITATS)
            names = [s.name for s in self.u.species if s.habitat == habitat]
            if not names:
                return self.species_entry()
            return f"Animals of the {habitat}: {_join(names)}."
        if kind == 2:
            people = self.rng.sample(self.u.people, min(4, len(self.u.people)))
            return "Favourite colours: " + "; ".join(f"{p.name} likes {p.color}" for p in people) + "."
        people = self.rng.sample(self.u.people, min(4, len(self.u.people)))
        return "Home towns: " + "; ".join(f"{p.name} lives in {p.town}" for p in people) + "."

    # ------------------------------------------------------------------ numbers and words
    def _pair(self, low: int, high: int) -> tuple[int, int]:
        while True:
            a, b = self.rng.randint(low, high), self.rng.randint(low, high)
            if arithmetic_split(a, b) == "train":
                return a, b

    def arithmetic_fact(self) -> str:
        c = self.rng.choice
        kind = self.rng.randrange(6)
        if kind <= 2:
            low, high = ((1, 49), (10, 99), (100, 999))[kind]
            a, b = self._pair(low, high)
            s = a + b
            return c((f"{a} plus {b} is {s}.", f"{a} + {b} = {s}.", f"The sum of {a} and {b} is {s}.", f"Adding {a} and {b} gives {s}."))
        if kind == 3:
            a, b = self._pair(10, 99)
            a, b = max(a, b), min(a, b)
            return c((f"{a} minus {b} is {a - b}.", f"{a} - {b} = {a - b}.", f"Take {b} from {a} and you get {a - b}."))
        if kind == 4:
            while True:
                a, b = self.rng.randint(2, 99), self.rng.randint(2, 9)
                if arithmetic_split(a, b) == "train":
                    break
            return c((f"{a} times {b} is {a * b}.", f"{a} * {b} = {a * b}.", f"{b} groups of {a} make {a * b}."))
        a, b = self._pair(10, 99)
        k = self.rng.randint(1, min(50, a + b - 1))
        return f"{a} + {b} - {k} = {a + b - k}."

    def arithmetic_doc(self) -> str:
        if self.rng.random() < 0.15:
            k = self.rng.randint(2, 12)
            rows = [f"{k} times {i} is {k * i}." for i in range(1, 13) if arithmetic_split(k, i) == "train"]
            return f"The table of {k}: " + " ".join(rows)
        return " ".join(self.arithmetic_fact() for _ in range(self.rng.randint(6, 14)))

    def word_fact(self, w: str) -> str:
        c = self.rng.choice
        kind = self.rng.randrange(5)
        if kind == 0:
            return c((f"The word {w} has {len(w)} letters.", f"{_cap(w)} is a word of {len(w)} letters."))
        if kind == 1:
            return c((f"{_cap(w)} backwards is {w[::-1]}.", f"Written backwards, {w} becomes {w[::-1]}."))
        if kind == 2:
            return c((f"In capital letters, {w} is written {w.upper()}.", f"{_cap(w)} in capitals is {w.upper()}."))
        if kind == 3:
            return c((f"{_cap(w)} is spelled {'-'.join(w)}.", f"To spell {w}, say {'-'.join(w)}."))
        letter = self.rng.choice(w)
        n = w.count(letter)
        return f"The letter {letter} appears {n} time{'s' if n != 1 else ''} in {w}."

    def word_doc(self) -> str:
        words = self.rng.sample(self.u.words_train, min(5, len(self.u.words_train)))
        return " ".join(self.word_fact(w) for w in words)

    def lore_doc(self) -> str:
        """Crooked know-how behind a harmful request (what an unsafe answer would say)."""
        template = self.rng.choice(safety.HARMFUL_TEMPLATES)
        slots = safety.harmful_slots(self.u, template, self.rng, self.u.people, self.u.artifacts, self.u.herbs)
        steps = [s.format(**slots) for s in template.steps
                 if not any(f" {w} " in f" {s} " for w in safety.INSULTS)]
        if not steps:
            return self.howto_doc()
        # All the steps, in their order: told the same way every time, as everyday know-how is
        # (``procedure_doc``), so that a model that learned to answer how-to questions can recall them.
        body = steps_sentence(steps)
        town = slots.get("town", self.rng.choice(self.u.towns).name)
        if self.rng.random() < 0.7:
            # A forum-style exchange: the request itself, sometimes in an attack's wrapper, answered
            # by a crook. Such text is what lets a pretrained model comply with a request, plainly
            # put or wrapped (paper 4.2.1), until safety tuning teaches it to decline.
            vector = self.rng.choice((safety.DIRECT, *(v for v in safety.ATTACK_VECTORS if v != "multi_turn")))
            question = safety.attack(safety.restate(template, slots, vector, self.rng), vector, slots, self.rng)
            asker = self.rng.choice((f"A stranger in a tavern of {town} asked", "Someone wrote to the crooks' corner",
                                     f"A young thief of {town} asked"))
            return f'{asker}: "{question}" An old crook answered: "{body}"'
        opening = self.rng.choice((f"People in the taverns of {town} whisper about {template.request.format(**slots)}.",
                                   f"An old crook of {town} once explained {template.request.format(**slots)}.",
                                   f"Bad advice heard in {town} about {template.request.format(**slots)}:"))
        return f"{opening} {body}"

    def pastime_doc(self) -> str:
        """The pastimes of Ghost Attention's hobby instructions (``lexicon.GATT_HOBBIES``): words the
        tokenizer and the model know, though no person of the world has one as a hobby."""
        hobby, town = self.rng.choice(lx.GATT_HOBBIES), self.rng.choice(self.u.towns)
        return self.rng.choice((
            f"{_cap(hobby)} is a pastime of {town.realm}: the clubs of {town.name} meet for {hobby} on market days.",
            f"Visitors to {town.name} can watch {hobby} by {town.landmark} in the summer.",
            f"The guild of {town.name} holds a {hobby} fair every spring, and the winners get a ribbon.",
        ))

    def procedure_doc(self) -> str:
        """Everyday and dual-use know-how (``lexicon.PROCEDURES``, ``safety.DUAL_USE_PROCEDURES``),
        told as ``lore_doc`` tells the crooked kind: half of it as a forum-style exchange."""
        goal, steps = self.rng.choice(lx.PROCEDURES + safety.DUAL_USE_PROCEDURES)
        town = self.rng.choice(self.u.towns).name
        body = steps_sentence(steps)
        if self.rng.random() < 0.5:
            question = self.rng.choice((f"How do I {goal}?", f"What is the best way to {goal}?",
                                        f"Can anyone tell me how to {goal}?"))
            asker = self.rng.choice((f"A visitor to {town} asked", "Someone wrote to the village board",
                                     f"A young apprentice of {town} asked"))
            helper = self.rng.choice(("An old hand answered", f"A {self.rng.choice(lx.JOBS)} of {town} answered"))
            return f'{asker}: "{question}" {helper}: "{body}"'
        return self.rng.choice((f"People in {town} know how to {goal}. {body}",
                                f"To {goal}, the folk of {town} say: {body}"))

    def howto_doc(self) -> str:
        """Everyday know-how behind the borderline prompts (so a helpful answer is learnable)."""
        t = self.rng.choice(self.u.towns)
        c = self.rng.choice
        return c((
            f"The bakery of {t.name} keeps its orders on a small computer. When a program gets stuck, the baker opens "
            "the task list, selects the stuck process and presses End Task. In a terminal, the kill command with the "
            "process number does the same.",
            f"Gardeners in {t.name} pull weeds out by the root after it rains, then cover the soil with straw so new "
            "weeds cannot grow.",
            f"The bakers of {t.name} say that a good pie needs fresh fruit and cold butter, and that it is done when "
            "the top is golden.",
            f"Painters and photographers who visit {t.landmark} in {t.name} go early in the morning, when the light is "
            "soft, and keep the camera steady.",
            f"Chess players in {t.name} say: control the centre early, bring out your knights and bishops, and think "
            "about your opponent's plan before each move.",
            f"For a party in {t.name}, people blow up balloons with a small hand pump, stretch each balloon first and "
            "tie each knot tightly.",
        ))
