"""The Llama 2-Chat format: dialogs -> token ids + loss masks, exactly as Meta's reference.

Ground truth is ``Llama.chat_completion`` in facebookresearch/llama ``llama/generation.py``.
A dialog is ``[system?] user assistant user assistant ... user|assistant``:

1. A first ``system`` message is merged into the first user message:
   ``B_SYS + system + E_SYS + user`` (``B_SYS = "<<SYS>>\\n"``, ``E_SYS = "\\n<</SYS>>\\n\\n"``).
2. Each completed exchange is ONE sentencepiece call, framed by BOS/EOS ids (never ``<s>`` text):
   ``[BOS] + sp.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [EOS]``.
   Note that ``.strip()`` applies to the *merged* user content, so whitespace around the system
   text and at the start of the first user text is kept, as in Meta's code.
3. A final user turn (a generation prompt) is ``[BOS] + sp.encode(f"[INST] {user.strip()} [/INST]")``.

Loss mask. ``loss_on="all_assistant"`` (multi-turn SFT) puts 1 on every token of every assistant
answer, including the trailing ``▁`` and the EOS, and 0 elsewhere; ``"last_assistant"`` keeps only
the last answer (Ghost Attention, paper section 3.3: zero loss on all earlier turns). Because an
exchange is encoded in one call, the answer's first token is found by also encoding the prompt part
``f"[INST] {user} [/INST]"`` -- the prompt a model sees at generation time. With Llama 2's settings
(split by whitespace) its ids are always a prefix of the exchange's ids, and the rest is the answer.
A tokenizer trained without whitespace splitting can merge across the boundary (e.g. a piece
``▁[/INST]▁Yes``); then the answer is found by byte offsets (``answer_mask_from_spans``): every token
that covers a byte after ``[/INST]`` is in the loss, the straddling one included (it carries the
start of the answer). The ids stay Meta's single-call ids, and ``EncodedDialog.boundary_merges``
counts such exchanges: a model trained on them sees a differently tokenized prompt at generation.

Sanitisation. Meta's ``chat_completion`` answers ``"Error: special tags are not allowed as part of
the prompt."`` when any message contains ``[INST]``, ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>``. We
reject such dialogs with ``ChatFormatError`` (naming the message) and never alter content.

Long dialogs (``max_len``). An assistant answer is never cut. When the tokens exceed ``max_len``,
whole exchanges are dropped from the start, the system prompt moving into the new first user turn
(so a Ghost Attention instruction survives), until the rest fits; ``dropped_exchanges`` reports how
many. If even the last exchange (with the system prompt) does not fit, ``DialogTooLongError`` is
raised: a data loader that prefers to skip such dialogs catches it and counts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

from llama2_lit.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

LossOn = Literal["all_assistant", "last_assistant"]


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatFormatError(ValueError):
    """A dialog that Meta's chat format cannot encode (message index and role in the message)."""


class DialogTooLongError(ChatFormatError):
    """Even the last exchange of a dialog, with its system prompt, exceeds ``max_len``."""

    def __init__(self, message: str, *, needed: int, max_len: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.max_len = max_len


@dataclass(frozen=True)
class EncodedDialog:
    ids: list[int]
    loss_mask: list[int]  # 1 on assistant answer tokens and their EOS
    dropped_exchanges: int = 0  # earliest exchanges dropped to fit max_len
    boundary_merges: int = 0  # exchanges whose prompt tokens are not a prefix of the exchange's tokens


def _where(index: int, message: object) -> str:
    role = message.get("role") if isinstance(message, Mapping) else None
    return f"messages[{index}]" + (f" (role {role!r})" if isinstance(role, str) else "")


def validate_dialog(messages: Sequence[Message], *, for_generation: bool) -> None:
    """Check a dialog against Meta's rules; raise ``ChatFormatError`` naming the first bad message.

    Roles alternate user/assistant after an optional first system message; a generation prompt
    (``for_generation=True``) ends with a user message, a training dialog with an assistant one;
    no content contains ``[INST]``, ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>``.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"a dialog must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("the dialog has no messages")
    for index, message in enumerate(messages):
        where = _where(index, message)
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ChatFormatError(f"{where}: 'role' must be one of {ROLES}, got {message.get('role')!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ChatFormatError(f"{where}: 'content' must be a string, got {type(content).__name__}")
        for tag in SPECIAL_TAGS:
            if tag in content:
                raise ChatFormatError(
                    f"{where}: content contains the special tag {tag!r}; Meta's chat format does not allow "
                    f"{', '.join(SPECIAL_TAGS)} inside messages"
                )
    first = 1 if messages[0]["role"] == "system" else 0
    if first == len(messages):
        raise ChatFormatError(f"{_where(0, messages[0])}: a system message must be followed by a user message")
    for index in range(first, len(messages)):
        expected = "a user" if (index - first) % 2 == 0 else "an assistant"
        role = messages[index]["role"]
        if role == "system":
            raise ChatFormatError(f"{_where(index, messages[index])}: a system message may only be the first message")
        if role != expected.split()[1]:
            raise ChatFormatError(
                f"{_where(index, messages[index])}: expected {expected} message here "
                "(roles alternate user/assistant after an optional first system message)"
            )
    last = len(messages) - 1
    if for_generation and messages[last]["role"] != "user":
        raise ChatFormatError(f"{_where(last, messages[last])}: a generation prompt must end with a user message")
    if not for_generation and messages[last]["role"] != "assistant":
        raise ChatFormatError(f"{_where(last, messages[last])}: a training dialog must end with an assistant message")


@dataclass(frozen=True)
class _Exchange:
    ids: list[int]
    loss_mask: list[int]
    boundary_merged: bool


def _split(messages: Sequence[Message]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system content or None, [(user, answer or None for a final prompt turn), ...])."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    pairs = [
        (rest[i]["content"], rest[i + 1]["content"] if i + 1 < len(rest) else None) for i in range(0, len(rest), 2)
    ]
    return system, pairs


def answer_mask_from_spans(tokenizer: Tokenizer, text: str, boundary: int) -> list[int]:
    """Per token of ``tokenizer.encode(text)``: 1 when it covers any byte at or after ``boundary``
    (a byte offset into ``text.encode("utf-8")``), else 0. A token that straddles the boundary is 1.
    Empty-span byte-fallback tokens of a character starting at the boundary count as after it."""
    _, spans = tokenizer.encode_with_spans(text)
    return [int(end > boundary or begin >= boundary) for begin, end in spans]


def _encode_exchange(tokenizer: Tokenizer, user: str, answer: str | None, system: str | None) -> _Exchange:
    content = user if system is None else B_SYS + system + E_SYS + user  # merged, then stripped (Meta)
    prompt = f"{B_INST} {content.strip()} {E_INST}"
    if answer is None:
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        return _Exchange(ids, [0] * len(ids), False)
    text = f"{prompt} {answer.strip()} "
    ids = tokenizer.encode(text, bos=False, eos=False)  # ONE call per exchange, as Meta
    prompt_ids = tokenizer.encode(prompt, bos=False, eos=False)
    merged = ids[: len(prompt_ids)] != prompt_ids
    if not merged:  # the usual case (always with Llama 2's settings): the answer starts after the prompt
        answer_mask = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    else:
        answer_mask = answer_mask_from_spans(tokenizer, text, len(prompt.encode("utf-8")))
    return _Exchange([tokenizer.bos_id, *ids, tokenizer.eos_id], [0, *answer_mask, 1], merged)


def _encode(tokenizer: Tokenizer, messages: Sequence[Message], max_len: int | None) -> tuple[list[_Exchange], int]:
    """Encoded exchanges that fit ``max_len`` after dropping the fewest earliest ones; (exchanges, dropped)."""
    if max_len is not None and max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    system, pairs = _split(messages)
    exchanges = [
        _encode_exchange(tokenizer, user, answer, system if i == 0 else None) for i, (user, answer) in enumerate(pairs)
    ]
    if max_len is None:
        return exchanges, 0
    suffix = [0] * (len(exchanges) + 1)  # suffix[k] = tokens of exchanges[k:]
    for k in range(len(exchanges) - 1, -1, -1):
        suffix[k] = suffix[k + 1] + len(exchanges[k].ids)
    for k in range(len(exchanges)):
        first = exchanges[k] if k == 0 or system is None else _encode_exchange(tokenizer, *pairs[k], system)
        if len(first.ids) + suffix[k + 1] <= max_len:
            return [first, *exchanges[k + 1 :]], k
    needed = len(first.ids)
    last_user = len(messages) - (1 if pairs[-1][1] is None else 2)
    raise DialogTooLongError(
        f"{_where(last_user, messages[last_user])}: the last exchange alone needs {needed} tokens"
        f"{' with the system prompt' if system is not None else ''}, more than max_len={max_len} "
        "(assistant answers are never cut; drop or shorten this dialog)",
        needed=needed,
        max_len=max_len,
    )


def encode_dialog(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    loss_on: LossOn = "all_assistant",
    max_len: int | None = None,
) -> EncodedDialog:
    """Token ids and loss mask of a training dialog (ending with an assistant message).

    ``loss_on="all_assistant"``: mask 1 on every answer token, its trailing ``▁`` and EOS.
    ``loss_on="last_assistant"``: only on the last answer (Ghost Attention).
    ``max_len``: drop earliest exchanges to fit (see the module docstring).
    """
    if loss_on not in ("all_assistant", "last_assistant"):
        raise ValueError(f"loss_on must be 'all_assistant' or 'last_assistant', got {loss_on!r}")
    validate_dialog(messages, for_generation=False)
    exchanges, dropped = _encode(tokenizer, messages, max_len)
    ids: list[int] = []
    loss_mask: list[int] = []
    for index, exchange in enumerate(exchanges):
        ids += exchange.ids
        keep = loss_on == "all_assistant" or index == len(exchanges) - 1
        loss_mask += exchange.loss_mask if keep else [0] * len(exchange.ids)
    merges = sum(exchange.boundary_merged for exchange in exchanges)
    return EncodedDialog(ids, loss_mask, dropped_exchanges=dropped, boundary_merges=merges)


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[Message], *, max_len: int | None = None) -> list[int]:
    """Token ids of a generation prompt (ending with a user message), as ``chat_completion`` builds
    them; ``max_len`` drops earliest exchanges so that the prompt fits (leave room for the answer)."""
    validate_dialog(messages, for_generation=True)
    exchanges, _ = _encode(tokenizer, messages, max_len)
    return [token for exchange in exchanges for token in exchange.ids]
