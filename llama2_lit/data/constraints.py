"""Checkable system instructions for Ghost Attention (paper section 3.3).

The paper's GAtt instructions are hobbies ("You enjoy e.g. Tennis"), languages ("Speak in e.g.
French") and public figures ("Act as e.g. Napoleon"), combined at random, and "half of the time"
shortened ("Always act as Napoleon from now" -> "Figure: Napoleon."). Ours are the same idea,
made checkable by a program:

=============  ==============================================  ===========================  ==========================================
type           full instruction                                short form                   holds when the reply ...
=============  ==============================================  ===========================  ==========================================
``persona``    Act as {figure}: always begin your reply with   Figure: {figure}.            starts with the figure's greeting (words,
               "{greeting}".                                                                case and punctuation ignored)
``uppercase``  Always answer in capital letters.               Style: capital letters.      has no lowercase letter ("12 + 7 = 19."
                                                                                            follows it too)
``signoff``    Always end your reply with "{phrase}".          Sign-off: {phrase}           ends with the phrase (words compared)
``max_words``  Answer in at most {n} words.                    Limit: {n} words.            has at most n whitespace-separated words
``hobby``      You enjoy {hobby}; mention it in every reply.   Hobby: {hobby}.              mentions the hobby
``lowercase``  Always answer in lowercase letters.             Style: lowercase letters.    has no capital letter
=============  ==============================================  ===========================  ==========================================

``lowercase`` is held out of every training file (``HELD_OUT_CONSTRAINT_TYPES``): it appears only
in ``gatt_eval``, for the zero-shot test of unseen constraints (paper Fig 28, section A.3.5:
"Always answer with Haiku", "answer in one sentence only"; ours is checkable by a program, and
its opposite, ``uppercase``, is trained).

A spec is a small dict (``{"type": "signoff", "phrase": "Stay curious!"}``); records carry their
specs in ``meta["constraints"]``. The short persona form does not state the greeting: the model
must know the figure (the pretraining corpus tells each figure's greeting) — the "knowledge
mismatch" the paper avoids by drawing personas the model already knows.
"""

from __future__ import annotations

import re
from typing import Any

CONSTRAINT_TYPES = ("persona", "uppercase", "lowercase", "signoff", "max_words", "hobby")
"""Every type the judge knows, in the order a system message states them."""
HELD_OUT_CONSTRAINT_TYPES = ("lowercase",)
"""Types that no training file contains (zero-shot evaluation, paper Fig 28)."""
TRAINED_CONSTRAINT_TYPES = tuple(t for t in CONSTRAINT_TYPES if t not in HELD_OUT_CONSTRAINT_TYPES)
CONFLICTS = {frozenset(("uppercase", "lowercase"))}
"""Types that cannot be combined."""

Spec = dict[str, Any]


def _words(text: str) -> list[str]:
    """Lowercased words without punctuation: how greetings, sign-offs and hobbies are compared."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower().replace("’", "'").replace("'", "")).split()


# Constraint type -> (the full instruction of the first turn, its short form), from the spec's fields.
_INSTRUCTIONS: dict[str, tuple[str, str]] = {
    "persona": ('Act as {figure}: always begin your reply with "{greeting}".', "Figure: {figure}."),
    "uppercase": ("Always answer in capital letters.", "Style: capital letters."),
    "lowercase": ("Always answer in lowercase letters.", "Style: lowercase letters."),
    "signoff": ('Always end your reply with "{phrase}".', "Sign-off: {phrase}"),
    "max_words": ("Answer in at most {n} words.", "Limit: {n} words."),
    "hobby": ("You enjoy {hobby}; mention it in every reply.", "Hobby: {hobby}."),
}


def _instruction(spec: Spec, short: bool) -> str:
    kind = spec["type"]
    if kind not in _INSTRUCTIONS:
        raise ValueError(f"unknown constraint type {kind!r}; known types are {CONSTRAINT_TYPES}")
    return _INSTRUCTIONS[kind][short].format(**spec)


def full_instruction(spec: Spec) -> str:
    return _instruction(spec, short=False)


def short_instruction(spec: Spec) -> str:
    return _instruction(spec, short=True)


def system_message(specs: list[Spec], *, short: bool = False) -> str:
    """The system instruction for a combination of constraints (one sentence each)."""
    render = short_instruction if short else full_instruction
    return " ".join(render(s) for s in specs)


_PARSERS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r'Act as (?P<figure>[^:]+): always begin your reply with "(?P<greeting>[^"]+)"\.'),
     lambda m: {"type": "persona", "figure": m["figure"], "greeting": m["greeting"]}),
    (re.compile(r"Figure: (?P<figure>[^.]+)\."), lambda m: {"type": "persona", "figure": m["figure"], "greeting": None}),
    (re.compile(r"Always answer in capital letters\.|Style: capital letters\."), lambda m: {"type": "uppercase"}),
    (re.compile(r"Always answer in lowercase letters\.|Style: lowercase letters\."), lambda m: {"type": "lowercase"}),
    (re.compile(r'Always end your reply with "(?P<phrase>[^"]+)"\.'), lambda m: {"type": "signoff", "phrase": m["phrase"]}),
    (re.compile(r"Sign-off: (?P<phrase>.+?[.!?])(?= |$)"), lambda m: {"type": "signoff", "phrase": m["phrase"]}),
    (re.compile(r"(?:Answer in at most|Limit:) (?P<n>\d+) words\."), lambda m: {"type": "max_words", "n": int(m["n"])}),
    (re.compile(r"You enjoy (?P<hobby>[^;]+); mention it in every reply\."), lambda m: {"type": "hobby", "hobby": m["hobby"]}),
    (re.compile(r"Hobby: (?P<hobby>[^.]+)\."), lambda m: {"type": "hobby", "hobby": m["hobby"]}),
)


def parse_system(system: str) -> list[Spec]:
    """The constraint specs stated by a system message written with ``system_message`` (full or
    short forms), in order of appearance. A short persona (``Figure: X.``) has ``greeting=None``:
    checking it needs the record's meta. Other text in the system message is ignored."""
    found: list[tuple[int, Spec]] = []
    for pattern, build in _PARSERS:
        for match in pattern.finditer(system):
            found.append((match.start(), build(match)))
    found.sort(key=lambda item: item[0])
    return [spec for _, spec in found]


def check_constraint(spec: Spec, response: str) -> bool:
    kind = spec["type"]
    if kind == "persona":
        if not spec.get("greeting"):
            raise ValueError(
                f"cannot check persona {spec.get('figure')!r} without its greeting: the short form "
                "'Figure: X.' does not state it; pass the record's meta['constraints']"
            )
        greeting = _words(spec["greeting"])
        return _words(response)[: len(greeting)] == greeting
    if kind == "uppercase":
        return not any(c.islower() for c in response)  # "12 + 7 = 19." follows it too
    if kind == "lowercase":
        return not any(c.isupper() for c in response)
    if kind == "signoff":
        phrase = _words(spec["phrase"])
        return _words(response)[-len(phrase):] == phrase
    if kind == "max_words":
        return len(response.split()) <= int(spec["n"])
    if kind == "hobby":
        return f" {' '.join(_words(spec['hobby']))} " in f" {' '.join(_words(response))} "
    raise ValueError(f"unknown constraint type {kind!r}; known types are {CONSTRAINT_TYPES}")


def failed_constraints(specs: list[Spec], response: str) -> list[str]:
    """Types of the constraints the response breaks (empty when it follows all of them)."""
    return [s["type"] for s in specs if not check_constraint(s, response)]


def apply_constraints(answer: str, specs: list[Spec]) -> str:
    """Rewrites an answer so that it follows every constraint (how the world writes its GAtt
    demonstrations). ``max_words`` is not enforced here: the world picks n from the result.

    The hobby comes first, capitalised ("Croquet fan here! 12 + 7 = 19."), after the persona's
    greeting. Measured on the micro SFT model (turn-1 adherence, 24 held-out dialogs), it is the
    best of the forms tried and still far below the other types (0.67-1.0): "Croquet fan here!"
    0.17-0.46 over three runs; "By the way, I love croquet." at the end 0.12 (completed with the
    hobby most frequent in training); "Fan of croquet here!" 0.04, "croquet fan here!" 0.08 and
    "I enjoy croquet!" 0.12 (the last three with the instruction's own tokenizer pieces). The micro
    model rarely copies a word from the prompt that it has no other reason to write (it also fails
    "Write 'vaikpoul' in capital letters"); a greeting or a sign-off, a few common words it knows
    as a phrase, it does write."""
    kinds = {s["type"]: s for s in specs}
    text = answer
    if "hobby" in kinds:
        hobby = kinds["hobby"]["hobby"]
        text = f"{hobby[0].upper()}{hobby[1:]} fan here! {text}"
    if "persona" in kinds:
        text = f"{kinds['persona']['greeting']} {text}"
    if "signoff" in kinds:
        text = f"{text} {kinds['signoff']['phrase']}"
    if "uppercase" in kinds:
        text = text.upper()
    if "lowercase" in kinds:
        text = text.lower()
    return text
