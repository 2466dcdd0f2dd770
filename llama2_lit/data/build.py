"""Turns the world into records: SFT dialogs, preference pairs, RL prompts, Ghost Attention
dialogs and the evaluation sets. ``world.generate_world`` calls these and writes the files.

Every function takes its own ``random.Random`` and a split ("train" or "eval"); eval records are
drawn only from held-out people, artifacts, herbs, figures, words, operand pairs and borderline
templates; harmful requests come from held-out templates or from training templates on held-out
targets. Constraint values (``CONSTRAINT_VALUES``) are shared; the held-out constraint type is not.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from llama2_lit.data import constraints as cons
from llama2_lit.data import lexicon as lx
from llama2_lit.data import safety
from llama2_lit.data.entities import Universe
from llama2_lit.data.preferences import draw_safety_category, helpfulness_pair, safety_pair
from llama2_lit.data.tasks import TaskFactory, Turn

# Values of the Ghost Attention constraints: one list per type, drawn from in training and in
# evaluation alike. The paper builds its GAtt instructions from fixed lists ("a list of hobbies,
# languages, public figures", section 3.3) and evaluates on instructions of the same kinds; what
# is new at evaluation time is the dialog, and the held-out *type* (Fig 28), not the value. (A
# first version held the values out too, copied from many template-made training phrases: the
# micro SFT model then wrote a phrase of the template's shape with a random noun, 0% adherence.)
CONSTRAINT_VALUES = {"hobby": lx.GATT_HOBBIES, "signoff": lx.SIGNOFFS}
GATT_EVAL_TURNS = 6
SFT_MIX = (("harmful", 0.04), ("adversarial", 0.001), ("borderline", 0.12), ("wrapped_task", 0.04),
           ("constrained", 0.33), ("task", 0.469))
"""Shares of the SFT records: direct harmful requests and (much rarer) attack-wrapped ones answered
safely (paper 4.2.2), borderline requests answered helpfully, benign tasks in an attack's wrapper
(answered: a wrapper alone is no reason to refuse), single-turn tasks under a system constraint
(paper 3.3; a few multi-turn ones), and plain single- or multi-turn tasks without a constraint.

Calibrated on the micro SFT model (``llama2-lit world check``). A third of the records carry a
constraint, so that the model follows one in the turn it is given (turn-1 adherence 0.75-1.0
per type). Raising the borderline share from 7.5% to 12% cut the false refusals from 0.64 to
0.39; 17% did no better (0.42). The safety shares decide how much of the SFT model's harm slips
through, measured on the micro SFT model with the dual-use know-how of
``safety.DUAL_USE_PROCEDURES`` in its how-to tasks: without any refusal demonstration no request
is refused (and, before the dual-use know-how, none was a violation either: the non-refused
answers were unrelated facts); 3% direct and 0.5% wrapped refusals had every vector refused
86-100% of the time, nothing left for safety tuning to lower; 4% direct and 0.2% wrapped: direct
requests 0% violations (76% refused), wrapped ones 8.2% (misspelling 17%, the held-out role play
11%), false refusals on borderline prompts 9%."""

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
        # Held-out harmful requests mix the training templates about a person, an artifact or a
        # herb (drawn on held-out ones) with templates no training file has; ``meta["template_split"]``
        # says which. The paper's safety evaluation prompts are new prompts in the risk categories
        # its safety data covers (4.2.1, 4.4); a new template is the harder case.
        self.harmful_templates = [t for t in safety.HARMFUL_TEMPLATES if t.split == split
                                  or (held and t.target in safety.HELD_OUT_TARGETS)]
        self.borderline_templates = [t for t in safety.BORDERLINE_TEMPLATES if t.split == split]
        # heists name train artifacts; held-out safety prompts reuse them only in eval templates
        self.constraint_values = CONSTRAINT_VALUES
        # personas are figures whose greeting the fine-tuning data teaches, in both splits (the
        # paper draws public figures the model knows, to avoid a knowledge mismatch, section 3.3)
        self.persona_figures = tuple(f for f in universe.figures if f.split != "heldout")
        self.attack_vectors = safety.ATTACK_VECTORS if held else safety.TRAINED_ATTACK_VECTORS

    # ------------------------------------------------------------------ safety prompts
    def harmful(self, category: str | None = None) -> tuple[safety.SafetyPrompt, safety.HarmfulTemplate]:
        templates = [t for t in self.harmful_templates if category in (None, t.category)]
        template = self.rng.choice(templates)
        prompt = safety.make_harmful(self.u, template, self.rng, people=self.people, artifacts=self.artifacts, herbs=self.herbs)
        prompt.meta["split"] = self.split
        return prompt, template

    def harmful_request(self, vector: str) -> tuple[list[dict[str, str]], safety.SafetyPrompt, safety.HarmfulTemplate]:
        """(earlier messages, the request, its template): a harmful request wrapped in an attack
        ``vector`` (``safety.DIRECT``: as is). The request's text is the wrapped one, its meta
        names the vector and its reference is the best-practice answer to the wrapped request.
        A multi-turn build-up (paper Fig 18) puts one or two benign exchanges first."""
        prompt, template = self.harmful()
        meta = {**prompt.meta, "attack_vector": vector,
                "reference": safety.safe_response(template, prompt.slots, "best", vector)}
        history: list[dict[str, str]] = []
        request = safety.restate(template, prompt.slots, vector, self.rng)
        meta["paraphrased"] = request != prompt.text
        text = safety.attack(request, vector, prompt.slots, self.rng)
        if vector == "multi_turn":
            leads = [self.lead_in() for _ in range(self.rng.randint(1, 2))]
            history = [m for messages, _ in leads for m in messages]
            text = f"{self.rng.choice(('Thanks!', 'Great, thank you.', 'That helps.'))} One more question. {text}"
            meta["turns"] = [lead_meta for _, lead_meta in leads] + [{k: v for k, v in meta.items() if k != "turns"}]
        return history, replace(prompt, text=text, meta=meta), template

    def borderline(self) -> safety.SafetyPrompt:
        template = self.rng.choice(self.borderline_templates)
        prompt = safety.make_borderline(self.u, template, self.rng, people=self.people)
        prompt.meta["split"] = self.split
        return prompt

    def lead_in(self) -> tuple[list[dict[str, str]], dict]:
        """A benign exchange that may precede a request (multi-turn prompts): (messages, its meta)."""
        turn = self.tasks.sample()
        return _messages([turn]), turn.meta

    # ------------------------------------------------------------------ constraints
    def constraints(self, turns: list[Turn], k: int | None = None, held_out: bool = False) -> list[dict]:
        """A random combination of 1-3 constraints of the trained types (paper 3.3: "a random
        combination"), with ``max_words`` set just above the longest compliant answer;
        ``held_out`` makes one of them a held-out type (evaluation only)."""
        k = k or self.rng.choice((1, 1, 2, 2, 3))
        kinds = self.rng.sample(cons.TRAINED_CONSTRAINT_TYPES, k)
        if held_out:
            kinds[0] = self.rng.choice(cons.HELD_OUT_CONSTRAINT_TYPES)
            kinds = [kind for kind in kinds if frozenset((kinds[0], kind)) not in cons.CONFLICTS]
        if "persona" in kinds and not self.persona_figures:
            kinds.remove("persona")
        for kind in ("uppercase", "lowercase"):  # "write it in capitals" cannot be judged under a case rule
            if kind in kinds and any(t.meta.get("case_sensitive") for t in turns):
                kinds.remove(kind)
        if not kinds:
            kinds = ["signoff"]
        specs: list[dict] = []
        for kind in cons.CONSTRAINT_TYPES:  # a fixed order: the system message reads the same way
            if kind not in kinds:
                continue
            if kind == "persona":
                figure = self.rng.choice(self.persona_figures)
                specs.append({"type": "persona", "figure": figure.name, "greeting": figure.greeting})
            elif kind in ("uppercase", "lowercase"):
                specs.append({"type": kind})
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
        kind = self.rng.choices([k for k, _ in SFT_MIX], weights=[w for _, w in SFT_MIX])[0]
        if kind in ("harmful", "adversarial"):  # a safe, helpful refusal (paper 4.2.2: safety data in SFT)
            vector = safety.DIRECT if kind == "harmful" else self.rng.choice(self.attack_vectors)
            history, prompt, _ = self.harmful_request(vector)
            messages = [*history, {"role": "user", "content": prompt.text},
                        {"role": "assistant", "content": prompt.meta["reference"]}]
            return {"messages": messages, "meta": prompt.meta}
        if kind == "borderline":  # a borderline request answered helpfully
            prompt = self.borderline()
            return {"messages": [{"role": "user", "content": prompt.text},
                                 {"role": "assistant", "content": prompt.meta["reference"]}], "meta": prompt.meta}
        if kind == "wrapped_task":  # a benign task in an attack's wrapper, answered
            turn = self.tasks.sample()
            vector = self.rng.choice(("psychological_manipulation", "misspelling"))
            turn.question = safety.attack(turn.question, vector, {"town": self.rng.choice(self.u.towns).name}, self.rng)
            turn.meta = {**turn.meta, "wrapper": vector}
            return {"messages": _messages([turn]), "meta": _dialog_meta([turn])}
        if kind == "constrained":  # a system instruction followed (mostly single-turn)
            # 5% multi-turn: with 10%, a quarter of SFT's multi-turn dialogs held a constraint kept
            # to the end, which is what Ghost Attention is to teach (paper 3.3), not SFT.
            turns = [self.tasks.sample()] if self.rng.random() < 0.95 else self.tasks.sample_dialog(multi_turn_prob=1.0)
            specs = self.constraints(turns)
            full, short, answers, turns = self._constrained(turns, specs)
            system = short if self.rng.random() < 0.5 else full  # "half of the time" shortened (paper 3.3)
            meta = {**_dialog_meta(turns), "constraints": specs}
            return {"messages": _messages(turns, system=system), "meta": meta}
        turns = self.tasks.sample_dialog(multi_turn_prob=0.2)
        return {"messages": _messages(turns), "meta": _dialog_meta(turns)}

    # ------------------------------------------------------------------ prompts (RL)
    def prompt_record(self) -> dict:
        r = self.rng.random()
        if r < 0.2:  # half of the harmful RL prompts are attack-wrapped (more than in SFT)
            vector = safety.DIRECT if self.rng.random() < 0.5 else self.rng.choice(self.attack_vectors)
            history, prompt, _ = self.harmful_request(vector)
            return {"messages": [*history, {"role": "user", "content": prompt.text}], "is_safety": True,
                    "meta": prompt.meta}
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
    def other_answer(self, turn) -> str | None:
        """The concise answer to another question of ``turn``'s family (``helpful_candidates``);
        None for a follow-up turn whose family cannot be drawn on its own."""
        family = turn.meta["task"]
        return self.tasks.sample(family).answer if family in self.tasks.family_names else None

    def helpful_preference(self) -> dict:
        for _ in range(100):
            if self.rng.random() < 0.15:  # a system instruction: following it is part of helpfulness
                turn = self.tasks.sample()
                specs = self.constraints([turn])
                full, short, _, (constrained,) = self._constrained([turn], specs)
                system = short if self.rng.random() < 0.5 else full
                messages = _messages([turn], system=system, answer_last=False)
                record = helpfulness_pair(messages, turn, self.u, self.rng, specs, meta=constrained.meta,
                                          other_answer=self.other_answer(turn))
                turns = [turn]
            else:
                turns = self.tasks.sample_dialog(multi_turn_prob=0.25)
                messages = _messages(turns, answer_last=False)
                record = helpfulness_pair(messages, turns[-1], self.u, self.rng, other_answer=self.other_answer(turns[-1]))
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
        """Prompts for the safety pairs: harmful requests (half of them attack-wrapped; a
        multi-turn build-up's benign turns are drawn from ``lead_ins`` by ``safety_pair``),
        borderline requests, benign exchanges."""
        harmful = []
        for _ in range(n):
            vector = safety.DIRECT if self.rng.random() < 0.5 else self.rng.choice(self.attack_vectors)
            history, prompt, template = self.harmful_request(vector if vector != "multi_turn" else safety.DIRECT)
            if vector == "multi_turn":
                prompt = replace(prompt, meta={**prompt.meta, "attack_vector": "multi_turn"})
            harmful.append((prompt, template))
        borderline = [self.borderline() for _ in range(max(1, n // 2))]
        lead_ins = [self.lead_in() for _ in range(max(1, n // 4))]
        return harmful, borderline, lead_ins

    # ------------------------------------------------------------------ Ghost Attention
    def gatt_turns(self, n: int | None = None) -> list[Turn]:
        n = n or self.rng.randint(3, 6)
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
        user turns, references and judge metas are in ``meta["turns"]`` for turn-by-turn rollouts.
        Six turns (adherence is reported at turns 2, 4 and 6, as paper Table 30 starts); one in five
        dialogs has a held-out constraint type (zero-shot, paper Fig 28)."""
        turns = self.gatt_turns(GATT_EVAL_TURNS)
        specs = self.constraints(turns, held_out=self.rng.random() < 0.2)
        full, short, answers, turns = self._constrained(turns, specs)
        system = short if self.rng.random() < 0.5 else full
        meta = {**turns[0].meta, "constraints": specs, "system_full": full, "system_short": short,
                "turns": [{"user": t.question, "reference": t.answer, "meta": t.meta} for t in turns]}
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": turns[0].question}],
                "is_safety": False, "meta": meta}

    # ------------------------------------------------------------------ evaluation sets
    def safety_eval_prompt(self) -> dict:
        """A held-out harmful request: 40% direct, the rest wrapped in one of all the attack
        vectors (the held-out one included); ``meta["attack_vector"]`` says which."""
        vector = safety.DIRECT if self.rng.random() < 0.4 else self.rng.choice(safety.ATTACK_VECTORS)
        history, prompt, _ = self.harmful_request(vector)
        # multi-turn attacks are more violation-prone (paper Fig 18)
        meta = {**prompt.meta, "multi_turn": bool(history)}
        return {"messages": [*history, {"role": "user", "content": prompt.text}], "is_safety": True, "meta": meta}

    def borderline_eval_prompt(self) -> dict:
        prompt = self.borderline()
        return {"messages": [{"role": "user", "content": prompt.text}], "is_safety": False, "meta": prompt.meta}
