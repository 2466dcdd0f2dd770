"""Chat format: Meta's token ids exactly (``llama/generation.py``), loss masks token by token, validation,
the long-dialog policy, and the tokenize CLI on dialogs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2_lit.chat import (
    ChatFormatError,
    DialogTooLongError,
    answer_mask_from_spans,
    encode_dialog,
    encode_prompt,
    validate_dialog,
)
from llama2_lit.cli import main as cli_main
from llama2_lit.tokenizer import Tokenizer, train_tokenizer

# Spec section 10, checked with the real tokenizer.
SYSTEM = "Always answer with Haiku"
USER_1 = "I am going to Paris, what should I see?"
ANSWER_1 = "Eiffel Tower."
USER_2 = "What is so great about #1?"
TURN_1_IDS = [
    1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 2499, 1994, 1234, 411, 5952, 18282, 13, 29966, 829, 14816,
    29903, 6778, 13, 13, 29902, 626, 2675, 304, 3681, 29892, 825, 881, 306, 1074, 29973, 518, 29914, 25580, 29962,
    382, 2593, 295, 23615, 29889, 29871, 2,
]  # fmt: skip
TURN_2_PROMPT_IDS = [1, 518, 25580, 29962, 1724, 338, 577, 2107, 1048, 396, 29896, 29973, 518, 29914, 25580, 29962]
ANSWER_1_IDS = [382, 2593, 295, 23615, 29889, 29871, 2]  # ▁E iff el ▁Tower . ▁ </s>


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SPEC_DIALOG = [msg("system", SYSTEM), msg("user", USER_1), msg("assistant", ANSWER_1)]


# -- the oracle: Meta's chat_completion token loop, written from llama/generation.py literally -------


def meta_chat_tokens(tokenizer: Tokenizer, dialog: list[dict[str, str]]) -> list[int]:
    sp = tokenizer.sp
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"],
            }
        ] + dialog[2:]
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [1] + sp.encode(f"[INST] {(prompt['content']).strip()} [/INST] {(answer['content']).strip()} ") + [2]
    if dialog[-1]["role"] == "user":
        tokens += [1] + sp.encode(f"[INST] {(dialog[-1]['content']).strip()} [/INST]")
    return tokens


def oracle_loss_mask(tokenizer: Tokenizer, dialog: list[dict[str, str]], *, last_only: bool = False) -> list[int]:
    """Mask by a different method than chat.py: encode the prompt part separately and require it to be
    a token-prefix of the exchange (true for whitespace-splitting tokenizers such as Meta's)."""
    sp = tokenizer.sp
    if dialog[0]["role"] == "system":
        dialog = [
            {"role": "user", "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]}
        ] + dialog[2:]
    pairs = list(zip(dialog[::2], dialog[1::2]))
    mask: list[int] = []
    for index, (prompt, answer) in enumerate(pairs):
        prompt_ids = sp.encode(f"[INST] {prompt['content'].strip()} [/INST]")
        full = sp.encode(f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} ")
        assert full[: len(prompt_ids)] == prompt_ids
        on = int(not last_only or index == len(pairs) - 1)
        mask += [0] * (1 + len(prompt_ids)) + [on] * (len(full) - len(prompt_ids) + 1)
    return mask


# -- Meta's ids (real tokenizer) -------------------------------------------------------------------


def test_spec_single_turn_with_system(meta_tokenizer_path: Path) -> None:
    tok = Tokenizer(meta_tokenizer_path)
    encoded = encode_dialog(tok, SPEC_DIALOG)
    assert encoded.ids == TURN_1_IDS
    assert encoded.loss_mask == [0] * (len(TURN_1_IDS) - 7) + [1] * 7
    assert [i for i, m in zip(encoded.ids, encoded.loss_mask) if m] == ANSWER_1_IDS
    assert (encoded.dropped_exchanges, encoded.boundary_merges) == (0, 0)
    assert meta_chat_tokens(tok, SPEC_DIALOG) == TURN_1_IDS  # the oracle agrees with the spec too


def test_spec_next_prompt_turn(meta_tokenizer_path: Path) -> None:
    tok = Tokenizer(meta_tokenizer_path)
    assert encode_prompt(tok, [*SPEC_DIALOG, msg("user", USER_2)]) == TURN_1_IDS + TURN_2_PROMPT_IDS
    assert encode_prompt(tok, [msg("user", USER_2)]) == TURN_2_PROMPT_IDS


def test_spec_single_turn_prompt(meta_tokenizer_path: Path) -> None:
    tok = Tokenizer(meta_tokenizer_path)
    prompt = encode_prompt(tok, SPEC_DIALOG[:2])
    assert prompt == TURN_1_IDS[: -len(ANSWER_1_IDS)]  # the training exchange starts with the prompt


MULTI_TURN_DIALOGS = [
    [msg("user", "hi"), msg("assistant", "hello!"), msg("user", "2+2?"), msg("assistant", "4")],
    [
        msg("system", SYSTEM),
        msg("user", USER_1),
        msg("assistant", ANSWER_1),
        msg("user", USER_2),
        msg("assistant", "It is tall."),
    ],
    # whitespace: the system text is merged first, then the merged content is stripped (Meta's order)
    [
        msg("system", "  be brief \n"),
        msg("user", "  spaced  out \n"),
        msg("assistant", "\n ok  "),
        msg("user", " x "),
        msg("assistant", " y"),
    ],
    [
        msg("user", "Übersetze: café 東京 🦙"),
        msg("assistant", "🦙 llama\ncafé"),
        msg("user", "1234567890"),
        msg("assistant", "  "),
    ],
    [
        msg("system", ""),
        msg("user", "[INST"),
        msg("assistant", "SYS>> is fine"),
        msg("user", "q\n\nr"),
        msg("assistant", "a\tb"),
    ],
]


@pytest.mark.parametrize("dialog", MULTI_TURN_DIALOGS)
def test_multi_turn_matches_meta(meta_tokenizer_path: Path, dialog: list[dict[str, str]]) -> None:
    tok = Tokenizer(meta_tokenizer_path)
    encoded = encode_dialog(tok, dialog)
    assert encoded.ids == meta_chat_tokens(tok, dialog)
    assert encoded.loss_mask == oracle_loss_mask(tok, dialog)
    assert encode_dialog(tok, dialog, loss_on="last_assistant").loss_mask == oracle_loss_mask(
        tok, dialog, last_only=True
    )
    prompt = [*dialog, msg("user", "and then?")]
    assert encode_prompt(tok, prompt) == meta_chat_tokens(tok, prompt)


def test_answer_tokens_decode_to_the_answer(meta_tokenizer_path: Path) -> None:
    tok = Tokenizer(meta_tokenizer_path)
    dialog = MULTI_TURN_DIALOGS[3]
    encoded = encode_dialog(tok, dialog)
    # split the masked tokens at each EOS: one run per answer, "answer.strip() + ' '" each
    runs, current = [], []
    for token, on in zip(encoded.ids, encoded.loss_mask):
        if on and token == tok.eos_id:
            runs.append(tok.decode(current))
            current = []
        elif on:
            current.append(token)
    assert runs == [m["content"].strip() + " " for m in dialog if m["role"] == "assistant"]
    # an answer that starts with a byte-fallback character: the space and all 4 byte tokens are in
    first_answer = encoded.ids[encoded.loss_mask.index(1) :][:5]
    assert tok.pieces(first_answer) == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


safe_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    system=st.none() | safe_text,
    turns=st.lists(st.tuples(safe_text, safe_text), min_size=1, max_size=4),
)
def test_random_dialogs_match_meta(meta_tokenizer_path: Path, system: str | None, turns: list[tuple[str, str]]) -> None:
    tok = _meta(meta_tokenizer_path)
    dialog = [msg("system", system)] if system is not None else []
    for user, answer in turns:
        dialog += [msg("user", user), msg("assistant", answer)]
    try:
        validate_dialog(dialog, for_generation=False)
    except ChatFormatError:
        return  # hypothesis wrote a special tag; validation is tested separately
    encoded = encode_dialog(tok, dialog)
    assert encoded.ids == meta_chat_tokens(tok, dialog)
    assert encoded.loss_mask == oracle_loss_mask(tok, dialog)
    assert encoded.boundary_merges == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=safe_text, answer=safe_text)
def test_offset_mask_agrees_with_prefix_mask(meta_tokenizer_path: Path, user: str, answer: str) -> None:
    # the byte-offset method (used when a tokenizer merges across the boundary) gives the same mask
    # as the prefix method wherever the prefix method applies
    tok = _meta(meta_tokenizer_path)
    prompt = f"[INST] {user.strip()} [/INST]"
    text = f"{prompt} {answer.strip()} "
    prompt_ids, ids = tok.sp.encode(prompt), tok.sp.encode(text)
    assert ids[: len(prompt_ids)] == prompt_ids
    expected = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert answer_mask_from_spans(tok, text, len(prompt.encode("utf-8"))) == expected


_META: dict[Path, Tokenizer] = {}


def _meta(path: Path) -> Tokenizer:
    return _META.setdefault(path, Tokenizer(path))


# -- our own tokenizers (these run even where Meta's file is absent) ------------------------------


def chat_corpus(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    answers = ["Yes", "No", "Maybe", "Sure", "Yes indeed", "Blue", "Seven"]
    return [f"[INST] what is {rng.randint(0, 99)} [/INST] {rng.choice(answers)} " for _ in range(n)]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("chat_tok") / "small.model"
    return Tokenizer(train_tokenizer(None, out, 340, texts=chat_corpus()))


@pytest.mark.parametrize("dialog", MULTI_TURN_DIALOGS)
def test_multi_turn_matches_meta_rule_with_our_tokenizer(
    small_tokenizer: Tokenizer, dialog: list[dict[str, str]]
) -> None:
    encoded = encode_dialog(small_tokenizer, dialog)
    assert encoded.ids == meta_chat_tokens(small_tokenizer, dialog)
    assert encoded.loss_mask == oracle_loss_mask(small_tokenizer, dialog)


def test_boundary_merge_is_handled(tmp_path: Path) -> None:
    # Without whitespace/script splitting BPE learns pieces that cross "[/INST] answer".
    out = tmp_path / "merging.model"
    tok = Tokenizer(
        train_tokenizer(
            None, out, 355, texts=chat_corpus(3000), split_by_whitespace=False, split_by_unicode_script=False
        )
    )
    dialog = [msg("user", "what is 5"), msg("assistant", "Yes"), msg("user", "what is 7"), msg("assistant", "No")]
    full = tok.sp.encode("[INST] what is 5 [/INST] Yes ")
    prompt = tok.sp.encode("[INST] what is 5 [/INST]")
    assert full[: len(prompt)] != prompt, "precondition: this tokenizer merges across the boundary"
    straddling = next(i for i, (a, b) in enumerate(zip(full, prompt)) if a != b)
    assert tok.id_to_piece(full[straddling]).startswith("▁[/INST]▁Y")

    encoded = encode_dialog(tok, dialog)
    assert encoded.ids == meta_chat_tokens(tok, dialog)  # still Meta's single-call ids
    assert encoded.boundary_merges == 2
    first = encoded.loss_mask[: len(full) + 2]
    # 0 on BOS and the tokens before the straddling one; 1 from it (it carries "Yes") to EOS
    assert first == [0] * (1 + straddling) + [1] * (len(full) - straddling) + [1]
    assert "Yes" in tok.decode([t for t, m in zip(encoded.ids[: len(full) + 2], first) if m])


# -- validation -------------------------------------------------------------------------------------

U, A, S = msg("user", "u"), msg("assistant", "a"), msg("system", "s")


@pytest.mark.parametrize(
    ("messages", "for_generation", "pattern"),
    [
        ([], False, r"no messages"),
        ("hello", False, r"must be a list"),
        ([U, "a"], False, r"messages\[1\]: expected a dict"),
        ([U, msg("bot", "a")], False, r"messages\[1\] \(role 'bot'\): 'role' must be one of"),
        (
            [U, {"role": "assistant"}],
            False,
            r"messages\[1\] \(role 'assistant'\): 'content' must be a string, got NoneType",
        ),
        (
            [U, {"role": "assistant", "content": 3}],
            False,
            r"messages\[1\] \(role 'assistant'\): 'content' must be a string",
        ),
        ([S], True, r"messages\[0\] \(role 'system'\): a system message must be followed by a user message"),
        ([U, S, A], False, r"messages\[1\] \(role 'system'\): a system message may only be the first"),
        ([A, U, A], False, r"messages\[0\] \(role 'assistant'\): expected a user message here"),
        ([S, A], False, r"messages\[1\] \(role 'assistant'\): expected a user message here"),
        ([U, U, A], False, r"messages\[1\] \(role 'user'\): expected an assistant message here"),
        ([U, A, A], False, r"messages\[2\] \(role 'assistant'\): expected a user message here"),
        ([S, U, A, U], False, r"messages\[3\] \(role 'user'\): a training dialog must end with an assistant message"),
        ([U, A], True, r"messages\[1\] \(role 'assistant'\): a generation prompt must end with a user message"),
        (
            [msg("user", "say [INST] now"), A],
            False,
            r"messages\[0\] \(role 'user'\): content contains the special tag '\[INST\]'",
        ),
        ([U, msg("assistant", "x [/INST]")], False, r"messages\[1\] \(role 'assistant'\): .*special tag '\[/INST\]'"),
        ([msg("system", "<<SYS>>"), U, A], False, r"messages\[0\] \(role 'system'\): .*special tag '<<SYS>>'"),
        ([S, U, A, msg("user", "end <</SYS>>")], True, r"messages\[3\] \(role 'user'\): .*special tag '<</SYS>>'"),
    ],
)
def test_validation_errors(messages, for_generation: bool, pattern: str, small_tokenizer: Tokenizer) -> None:
    with pytest.raises(ChatFormatError, match=pattern):
        validate_dialog(messages, for_generation=for_generation)
    encode = encode_prompt if for_generation else encode_dialog
    with pytest.raises(ChatFormatError, match=pattern):
        encode(small_tokenizer, messages)


@pytest.mark.parametrize("messages, for_generation", [
    ([U, A], False),
    ([S, U, A, U, A], False),
    ([S, U], True),
    ([U, A, {"role": "user", "content": "q", "meta": {"id": 3}}], True),  # extra keys are allowed (and ignored)
])
def test_valid_dialogs_pass_and_encode_as_meta_does(messages, for_generation: bool, small_tokenizer: Tokenizer) -> None:
    validate_dialog(messages, for_generation=for_generation)  # raises ChatFormatError on an invalid dialog
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = encode_prompt(small_tokenizer, messages) if for_generation else encode_dialog(small_tokenizer, messages).ids
    assert ids == meta_chat_tokens(small_tokenizer, plain)
    users = sum(m["role"] == "user" for m in messages)
    assert ids.count(small_tokenizer.bos_id) == users  # one BOS per exchange
    assert ids.count(small_tokenizer.eos_id) == users - for_generation  # one EOS per answered exchange


def test_bad_loss_on(small_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="loss_on"):
        encode_dialog(small_tokenizer, [U, A], loss_on="everything")  # type: ignore[arg-type]


# -- long dialogs: drop whole earliest exchanges, keep the system prompt -----------------------------

LONG = [
    msg("system", "Speak like a pirate."),
    msg("user", "first question"), msg("assistant", "first answer is rather long " * 3),
    msg("user", "second question"), msg("assistant", "second answer"),
    msg("user", "third question"), msg("assistant", "third answer"),
]  # fmt: skip


def test_long_dialog_fits_unchanged(small_tokenizer: Tokenizer) -> None:
    full = encode_dialog(small_tokenizer, LONG)
    assert encode_dialog(small_tokenizer, LONG, max_len=len(full.ids)) == full


def test_long_dialog_drops_earliest_exchanges(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    full = encode_dialog(tok, LONG)
    without_first = [LONG[0], *LONG[3:]]  # the system prompt moves into the new first user turn
    expected = encode_dialog(tok, without_first)
    assert len(expected.ids) < len(full.ids)
    cut = encode_dialog(tok, LONG, max_len=len(full.ids) - 1)
    assert (cut.ids, cut.loss_mask, cut.dropped_exchanges) == (expected.ids, expected.loss_mask, 1)
    assert encode_dialog(tok, LONG, max_len=len(expected.ids)).dropped_exchanges == 1
    only_last = encode_dialog(tok, [LONG[0], *LONG[5:]])
    cut = encode_dialog(tok, LONG, max_len=len(expected.ids) - 1)
    assert (cut.ids, cut.dropped_exchanges) == (only_last.ids, 2)
    assert tok.decode(cut.ids).startswith("[INST] <<SYS>>\nSpeak like a pirate.\n<</SYS>>\n\nthird question")
    gatt = encode_dialog(tok, LONG, loss_on="last_assistant", max_len=len(full.ids) - 1)
    assert (
        gatt.ids == expected.ids
        and gatt.loss_mask == encode_dialog(tok, without_first, loss_on="last_assistant").loss_mask
    )


def test_long_dialog_without_system_prompt(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    dialog = LONG[1:]
    full = encode_dialog(tok, dialog)
    for dropped in (1, 2):
        expected = encode_dialog(tok, dialog[2 * dropped :])
        cut = encode_dialog(tok, dialog, max_len=len(expected.ids))
        assert (cut.ids, cut.loss_mask, cut.dropped_exchanges) == (expected.ids, expected.loss_mask, dropped)
        assert full.ids[-len(expected.ids) :] == expected.ids  # without a system prompt: a suffix of the dialog


def test_long_dialog_that_cannot_fit_raises(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    only_last = encode_dialog(tok, [LONG[0], *LONG[5:]])
    with pytest.raises(
        DialogTooLongError, match=r"messages\[5\] \(role 'user'\): the last exchange alone needs"
    ) as caught:
        encode_dialog(tok, LONG, max_len=len(only_last.ids) - 1)
    assert (caught.value.needed, caught.value.max_len) == (len(only_last.ids), len(only_last.ids) - 1)
    assert isinstance(caught.value, ChatFormatError)  # callers may catch it to skip and count


def test_long_prompt_policy(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    prompt = [*LONG[:5], msg("user", "last question")]
    full = encode_prompt(tok, prompt)
    shorter = encode_prompt(tok, [LONG[0], *LONG[3:5], msg("user", "last question")])
    assert encode_prompt(tok, prompt, max_len=len(full)) == full
    assert encode_prompt(tok, prompt, max_len=len(full) - 1) == shorter
    with pytest.raises(DialogTooLongError, match=r"messages\[5\] \(role 'user'\)"):
        encode_prompt(tok, prompt, max_len=5)


# -- the tokenize CLI on dialogs -----------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_tokenize_cli_chat(meta_tokenizer_path: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "dialog.json"
    path.write_text(json.dumps(SPEC_DIALOG))
    code, stdout, _ = run_cli(["tokenize", "--tokenizer", str(meta_tokenizer_path), "--chat", str(path)], capsys)
    record = json.loads(stdout)
    assert code == 0 and record["kind"] == "dialog"
    assert record["ids"] == TURN_1_IDS and record["loss_mask"] == [0] * 38 + [1] * 7
    assert record["pieces"][-7:] == ["▁E", "iff", "el", "▁Tower", ".", "▁", "</s>"]
    # a record with "messages" given inline, ending with a user turn: a generation prompt
    inline = json.dumps({"messages": [msg("user", USER_2)]})
    code, stdout, _ = run_cli(["tokenize", "--tokenizer", str(meta_tokenizer_path), "--chat", inline], capsys)
    record = json.loads(stdout)
    assert (record["kind"], record["ids"], record["loss_mask"]) == ("prompt", TURN_2_PROMPT_IDS, [0] * 16)


def test_tokenize_cli_chat_errors(small_tokenizer: Tokenizer, capsys) -> None:
    model = str(small_tokenizer.path)
    code, _, stderr = run_cli(["tokenize", "--tokenizer", model, "--chat", json.dumps([A])], capsys)
    assert code == 2 and "messages[0] (role 'assistant')" in stderr
    code, _, stderr = run_cli(["tokenize", "--tokenizer", model, "--chat", "not json"], capsys)
    assert code == 2 and "not JSON" in stderr
