"""Ghost Attention (paper section 3.3, Fig 9): data that teaches a system instruction to hold for a
whole dialog.

The paper's procedure, step by step, and where it is here:

1. Start from multi-turn dialogs ``[u1, a1, ..., un, an]`` and an instruction ``inst`` that should
   hold throughout (the toy world's ``gatt_train`` records: a system constraint, e.g.
   ``Figure: Duchess Landma.``, and its checkable specs in ``meta["constraints"]``).
2. "Synthetically concatenate this instruction to all the user messages of the conversation"
   (``sampling_messages``): ``inst`` is the system message of turn 1 (in the Llama 2 chat format
   that already *is* concatenated to the first user message) and is written in front of every
   later user message.
3. "Sample from this synthetic data using the latest RLHF model" (``synthesize_gatt_data``): the
   answers are generated turn after turn, each with the model's own earlier answers as context.
4. In the training example ``inst`` is kept "only in the first turn" (``training_messages``).
5. "Set the loss to 0 for all the tokens from the previous turns, including assistant messages"
   -- fine-tune with ``SFTDataModule(loss_on="last_assistant")``: only the final answer is a
   target (``chat.encode_dialog`` then masks every earlier token).

"Half of the time" the instruction is the shortened form (``Figure: Napoleon.`` for ``Always act
as Napoleon from now``); the world's records carry both (``meta["system_full"]`` and
``meta["system_short"]``) and the choice is drawn per dialog.

The paper does not say whether synthesized dialogs are filtered. Because the step is "analogous to
Rejection Sampling", we keep a dialog only when its final answer -- the one trained on -- meets
every constraint (``data.constraints.failed_constraints``), when ``require_adherence`` is on; the
share kept is reported.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llama2_lit.chat import Message, encode_prompt
from llama2_lit.data.constraints import failed_constraints
from llama2_lit.generation import generate, sample_seed
from llama2_lit.model import Transformer
from llama2_lit.tokenizer import Tokenizer


def instructed_user_message(instruction: str, user: str) -> str:
    """A later user message with the instruction written in front of it (step 2 above)."""
    return f"{instruction} {user}"


def sampling_messages(instruction: str, users: Sequence[str], answers: Sequence[str]) -> list[Message]:
    """The synthetic dialog the model answers: ``inst`` on every user turn.

    ``users`` has one more element than ``answers`` (the turn being answered is last).
    """
    if len(users) != len(answers) + 1:
        raise ValueError(f"{len(users)} user turns need {len(users) - 1} earlier answers, got {len(answers)}")
    messages: list[Message] = [{"role": "system", "content": instruction}]
    for turn, user in enumerate(users):
        messages.append({"role": "user", "content": user if turn == 0 else instructed_user_message(instruction, user)})
        if turn < len(answers):
            messages.append({"role": "assistant", "content": answers[turn]})
    return messages


def training_messages(instruction: str, users: Sequence[str], answers: Sequence[str]) -> list[Message]:
    """The training dialog: ``inst`` only in the first turn (step 4 above)."""
    if len(users) != len(answers):
        raise ValueError(f"{len(users)} user turns but {len(answers)} answers")
    messages: list[Message] = [{"role": "system", "content": instruction}]
    for user, answer in zip(users, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


@dataclass
class GattDialog:
    """One dialog to synthesize: the instruction, its checkable specs and the user turns."""

    instruction: str
    short: bool
    specs: list[dict[str, Any]]
    users: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)


def gatt_dialogs(records: Sequence[dict[str, Any]], *, short_probability: float = 0.5,
                 seed: int = 0) -> list[GattDialog]:
    """The dialogs of ``chat`` records with a system instruction, the instruction's form drawn per dialog.

    A record without ``meta["system_full"]``/``meta["system_short"]`` keeps its own system message.
    """
    rng = random.Random(seed)
    dialogs = []
    for number, record in enumerate(records, start=1):
        messages, meta = record["messages"], record.get("meta", {})
        if not messages or messages[0]["role"] != "system":
            raise ValueError(f"record {number}: a Ghost Attention dialog starts with a system message")
        short = rng.random() < short_probability
        instruction = meta.get("system_short" if short else "system_full") or messages[0]["content"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        dialogs.append(GattDialog(instruction, short, list(meta.get("constraints", [])), users, meta))
    return dialogs


def turn_seed(seed: int, dialog: int, turn: int) -> int:
    """The sampling seed of one answer: fixed by (seed, dialog, turn), not by its batch neighbours."""
    return sample_seed(seed, turn, dialog, 0)


def synthesize_gatt_data(model: Transformer, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], *,
                         temperature: float = 0.6, top_p: float = 0.9, max_new_tokens: int = 64,
                         short_probability: float = 0.5, require_adherence: bool = True, seed: int = 0,
                         batch_size: int = 32) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ghost Attention training records sampled from ``model``, and a summary.

    Answers are generated turn by turn for all dialogs at once (turn ``t`` of every dialog that
    has one, in batches), each from ``sampling_messages``; the records hold ``training_messages``
    and ``meta["gatt"]`` (the instruction, its form, and whether each sampled answer met the
    constraints). A dialog ends at its first empty answer (an empty reply follows no instruction
    and is no chat turn); one without any answer is dropped. The summary counts dialogs, kept
    dialogs, dialogs ended early and per-turn adherence of the samples.
    """
    dialogs = gatt_dialogs(records, short_probability=short_probability, seed=seed)
    room = model.config.max_seq_len - max_new_tokens
    adherent: list[list[bool]] = [[] for _ in dialogs]
    ended_early = 0
    for turn in range(max((len(d.users) for d in dialogs), default=0)):
        active = [i for i, d in enumerate(dialogs) if len(d.users) > turn]
        for start in range(0, len(active), batch_size):
            rows = active[start:start + batch_size]
            prompts = [encode_prompt(tokenizer, sampling_messages(dialogs[i].instruction, dialogs[i].users[:turn + 1],
                                                                  dialogs[i].answers), max_len=room) for i in rows]
            out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           eos_id=tokenizer.eos_id, generator=[turn_seed(seed, i, turn) for i in rows])
            for i, ids in zip(rows, out.response_tokens()):
                answer = tokenizer.decode(ids).strip()
                if not answer:  # the model stopped answering: the dialog ends before this turn
                    dialogs[i].users = dialogs[i].users[:turn]
                    ended_early += 1
                    continue
                dialogs[i].answers.append(answer)
                adherent[i].append(not failed_constraints(dialogs[i].specs, answer))

    out_records, kept = [], 0
    for dialog, flags in zip(dialogs, adherent):
        if not flags or (require_adherence and not flags[-1]):
            continue
        kept += 1
        meta = {**dialog.meta, "gatt": {"instruction": dialog.instruction, "short": dialog.short,
                                        "adherent": flags, "temperature": temperature}}
        out_records.append({"messages": training_messages(dialog.instruction, dialog.users, dialog.answers),
                            "meta": meta})
    by_turn: dict[int, list[bool]] = {}
    for flags in adherent:
        for turn, ok in enumerate(flags, start=1):
            by_turn.setdefault(turn, []).append(ok)
    summary = {"dialogs": len(dialogs), "kept": kept, "ended_at_empty_answer": ended_early,
               "sample_adherence_by_turn": {t: sum(v) / len(v) for t, v in sorted(by_turn.items())}}
    return out_records, summary
