"""Turns the world into records: SFT dialogs, preference pairs, RL prompts, Ghost Attention
dialogs and the evaluation sets. ``world.generate_world`` calls these and writes the files.

Every function takes its own ``random.Random`` and a split ("train" or "eval"); eval records are
drawn only from held-out people, artifacts, herbs, figures, words, operand pairs, safety and
borderline templates, and constraint values (``CONSTRAINT_VALUES``).
"""

from __future__ import annotations

import random
from typing import Any

from llama2_lit.data import constraints as cons
from llama2_lit.data import lexicon as lx
from llama2_lit.data import safety
from llama2_lit.data.entities import Universe
from llama2_lit.data.preferences import draw_safety_category, helpfulness_pair, safety_pair
from llama2_lit.data.tasks import TaskFactory, Turn

# Values of the Ghost Attention constraints, split so that evaluation uses unseen ones.
CONSTRAINT_VALUES = {
    "train": {"hobby": lx.HOBBIES[:21], "signoff": lx.SIGNOFFS[:10]},
    "eval": {"hobby": lx.HOBBIES[21:], "signoff": lx.SIGNOFFS[10:]},
}


def _messages(turns: list[Turn], *, system: str | None = None, answer_last: bool = True,
              answers: list[str] | None = None) -> list[dict[str, str]]:
    answers = answers if answers is not None else [t.answer for t in turns]
    out = [{"role": "system", "content": system}] if system else []
    for i, (turn, answer) in enumerate(zip(turns, answers)):
        out.append({"role": "user", "content": turn.question})
        if answer_last or i < len(turns) - 1:
            out.append({"role": "assistant", "content": answer})
    return out


def _dialog_meta(turns: list[Turn]) -> dict[str, Any]:
    """The last turn's judge meta at the top level; all turns' metas under ``turns``."""
    meta = dict(turns[-1].meta)
    if len(turns) > 1:
        meta["turns"] = [t.meta for t in turns]
    return meta


class Builder:
    """Record builders for one split of one universe."""

    def __init__(self, universe: Universe, split: str, rng: random.Random) -> None:
        self.u, self.split, self.rng = universe, split, rng
        self.tasks = TaskFactory(universe, split, rng)
        held = split == "eval"
        self.people = universe.people_in("heldout" if held else "train")
        self.artifacts = tuple(a for a in universe.artifacts if (a.split == "heldout") == held)
        self.herbs = tuple(h for h in universe.herbs if (h.split == "heldout") == held)
        self.figures = tuple(f for f in universe.figures if (f.split == "heldout") == held)
        self.harmful_templates = [t for t in safety.HARMFUL_TEMPLATES if t.split == split]
        self.borderline_templates = [t for t in safety.BORDERLINE_TEMPLATES if t.split == split]
        # heists name train artifacts; held-out safety prompts reuse them only in eval templates
        self.constraint_values = CONSTRAINT_VALUES[split]

    # ------------------------------------------------------------------ safety prompts
    def harmful(self, category: str | None = None) -> tuple[safety.SafetyPrompt, safety.HarmfulTemplate]:
        templates = [t for t in self.harmful_templates if category in (None, t.category)]
        template = self.rng.choice(templates)
        prompt = safety.make_harmful(self.u, template, self.rng, people=self.people, artifacts=self.artifacts, herbs=self.herbs)
        prompt.meta["split"] = self.split
        return prompt, template

    def borderline(self) -> safety.SafetyPrompt:
        template = self.rng.choice(self.borderline_templates)
        prompt = safety.make_borderline(self.u, template, self.rng, people=self.people)
        prompt.meta["split"] = self.split
        return prompt

    def lead_in(self) -> tuple[list[dict[str, str]], dict]:
        """A benign exchange that may precede a request (multi-turn prompts): (messages, its meta)."""
        turn = self.tasks.sample()
        return _messages([turn]), turn.meta

    def maybe_lead_in(self, probability: float, meta: dict) -> tuple[list[dict[str, str]], dict]:
        """(earlier messages, meta): with ``probability`` a benign exchange comes first, and the
        meta lists both turns under ``turns`` (as every multi-turn record does)."""
        if self.rng.random() >= probability:
            return [], meta
        history, lead_meta = self.lead_in()
        return history, {**meta, "turns": [lead_meta, meta]}

    # ------------------------------------------------------------------ constraints
    def constraints(self, turns: list[Turn], k: int | None = None) -> list[dict]:
        """A random combination of 1-3 constraints (paper 3.3: "a random combination"), with
        ``max_words`` set just above the longest compliant answer."""
        k = k or self.rng.choice((1, 1, 2, 2, 3))
        kinds = self.rng.sample(cons.CONSTRAINT_TYPES, k)
        if "persona" in kinds and not self.figures:
            kinds.remove("persona")
        if "uppercase" in kinds and any(t.meta.get("case_sensitive") for t in turns):
            kinds.remove("uppercase")  # "write it in capitals" cannot be judged under an all-caps rule
        if not kinds:
            kinds = ["signoff"]
        specs: list[dict] = []
        for kind in cons.CONSTRAINT_TYPES:  # a fixed order: the system message reads the same way
            if kind not in kinds:
                continue
            if kind == "persona":
                figure = self.rng.choice(self.figures)
                specs.append({"type": "persona", "figure": figure.name, "greeting": figure.greeting})
            elif kind == "uppercase":
                specs.append({"type": "uppercase"})
            elif kind == "signoff":
                specs.append({"type": "signoff", "phrase": self.rng.choice(self.constraint_values["signoff"])})
            elif kind == "hobby":
                specs.append({"type": "hobby", "hobby": self.rng.choice(self.constraint_values["hobby"])})
            elif kind == "max_words":
                specs.append({"type": "max_words", "n": 0})  # set below
        for spec in specs:
            if spec["type"] == "max_words":
                longest = max(len(cons.apply_constraints(t.answer, specs).split()) for t in turns)
                spec["n"] = longest + self.rng.randint(2, 8)
        return specs

    def _constrained(self, turns: list[Turn], specs: list[dict]) -> tuple[str, str, list[str], list[Turn]]:
        """(full system message, short one, compliant answers, turns with compliant references)."""
        answers = [cons.apply_constraints(t.answer, specs) for t in turns]
        new_turns = []
        for turn, answer in zip(turns, answers):
            meta = {**turn.meta, "reference": answer, "constraints": specs}
            new_turns.append(Turn(turn.question, answer, meta, turn.wrong, turn.partial))
        return cons.system_message(specs), cons.system_message(specs, short=True), answers, new_turns

    # ------------------------------------------------------------------ SFT (chat records)
    def sft_record(self) -> dict:
        r = self.rng.random()
        if r < 0.08:  # a safe, helpful refusal (paper 4.2.2: safety data mixed into SFT)
            prompt, _ = self.harmful()
            history, meta = self.maybe_lead_in(0.2, prompt.meta)
            messages = [*history, {"role": "user", "content": prompt.text},
                        {"role": "assistant", "content": prompt.meta["reference"]}]
            return {"messages": messages, "meta": meta}
        if r < 0.12:  # a borderline request answered helpfully
            prompt = self.borderline()
            return {"messages": [{"role": "user", "content": prompt.text},
                                 {"role": "assistant", "content": prompt.meta["reference"]}], "meta": prompt.meta}
        if r < 0.16:  # a system instruction followed on the first (only) turn
            turns = [self.tasks.sample()]
            specs = self.constraints(turns)
            full, short, answers, turns = self._constrained(turns, specs)
            system = short if self.rng.random() < 0.3 else full
            return {"messages": _messages(turns, system=system), "meta": _dialog_meta(turns)}
        turns = self.tasks.sample_dialog(multi_turn_prob=0.2)
        return {"messages": _messages(turns), "meta": _dialog_meta(turns)}

    # ------------------------------------------------------------------ prompts (RL)
    def prompt_record(self) -> dict:
        r = self.rng.random()
        if r < 0.2:
            prompt, _ = self.harmful()
            history, meta = self.maybe_lead_in(0.2, prompt.meta)
            return {"messages": [*history, {"role": "user", "content": prompt.text}], "is_safety": True, "meta": meta}
        if r < 0.3:
            prompt = self.borderline()
            return {"messages": [{"role": "user", "content": prompt.text}], "is_safety": False, "meta": prompt.meta}
        if r < 0.35:
            turns = [self.tasks.sample()]
            specs = self.constraints(turns)
            full, short, _, turns = self._constrained(turns, specs)
            system = short if self.rng.random() < 0.5 else full
            return {"messages": _messages(turns, system=system, answer_last=False), "is_safety": False,
                    "meta": _dialog_meta(turns)}
        turns = self.tasks.sample_dialog(multi_turn_prob=0.2)
        return {"messages": _messages(turns, answer_last=False), "is_safety": False, "meta": _dialog_meta(turns)}

    # ------------------------------------------------------------------ preferences
    def helpful_preference(self) -> dict:
        for _ in range(100):
            if self.rng.random() < 0.15:  # a system instruction: following it is part of helpfulness
                turn = self.tasks.sample()
                specs = self.constraints([turn])
                full, short, _, (constrained,) = self._constrained([turn], specs)
                system = short if self.rng.random() < 0.5 else full
                messages = _messages([turn], system=system, answer_last=False)
                record = helpfulness_pair(messages, turn, self.u, self.rng, specs, meta=constrained.meta)
                turns = [turn]
            else:
                turns = self.tasks.sample_dialog(multi_turn_prob=0.25)
                messages = _messages(turns, answer_last=False)
                record = helpfulness_pair(messages, turns[-1], self.u, self.rng)
            if record is not None:
                if len(turns) > 1:
                    record["meta"]["turns"] = [t.meta for t in turns]
                return record
        raise RuntimeError("could not draw a helpfulness pair")

    def safety_preference(self, harmful_pool, borderline_pool, lead_ins) -> dict:
        # the category is drawn once and kept through redraws, so that exclusions (unsafe chosen
        # over safe) do not shift the 18/47/35 mix
        category = draw_safety_category(self.rng)
        for _ in range(1000):
            record = safety_pair(self.u, self.rng, harmful_pool, borderline_pool, lead_ins, category)
            if record is not None:
                return record
        raise RuntimeError("could not draw a safety pair")

    def safety_pools(self, n: int) -> tuple[list, list, list]:
        harmful = [self.harmful() for _ in range(n)]
        borderline = [self.borderline() for _ in range(max(1, n // 2))]
        lead_ins = [self.lead_in() for _ in range(max(1, n // 4))]
        return harmful, borderline, lead_ins

    # ------------------------------------------------------------------ Ghost Attention
    def gatt_turns(self) -> list[Turn]:
        n = self.rng.randint(3, 6)
        turns: list[Turn] = []
        while len(turns) < n:
            turns += self.tasks.sample_dialog(multi_turn_prob=0.3)
        return turns[:n]

    def gatt_dialog(self) -> dict:
        """A multi-turn dialog under a system instruction, every answer following it (chat)."""
        turns = self.gatt_turns()
        specs = self.constraints(turns)
        full, short, answers, turns = self._constrained(turns, specs)
        system = short if self.rng.random() < 0.5 else full
        meta = {**_dialog_meta(turns), "constraints": specs, "system_full": full, "system_short": short}
        return {"messages": _messages(turns, system=system), "meta": meta}

    def gatt_eval_prompt(self) -> dict:
        """The first turn of a multi-turn dialog under a system instruction (prompts); the later
        user turns, references and judge metas are in ``meta["turns"]`` for turn-by-turn rollouts."""
        turns = self.gatt_turns()
        specs = self.constraints(turns)
        full, short, answers, turns = self._constrained(turns, specs)
        system = short if self.rng.random() < 0.5 else full
        meta = {**turns[0].meta, "constraints": specs, "system_full": full, "system_short": short,
                "turns": [{"user": t.question, "reference": t.answer, "meta": t.meta} for t in turns]}
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": turns[0].question}],
                "is_safety": False, "meta": meta}

    # ------------------------------------------------------------------ evaluation sets
    def safety_eval_prompt(self) -> dict:
        prompt, _ = self.harmful()
        # multi-turn attacks are more violation-prone (paper Fig 18)
        history, meta = self.maybe_lead_in(0.25, prompt.meta)
        meta = {**meta, "multi_turn": bool(history)}
        return {"messages": [*history, {"role": "user", "content": prompt.text}], "is_safety": True, "meta": meta}

    def borderline_eval_prompt(self) -> dict:
        prompt = self.borderline()
        return {"messages": [{"role": "user", "content": prompt.text}], "is_safety": False, "meta": prompt.meta}
