"""Record formats: validation with file/line/field errors, sources (jsonl, json, parquet, txt,
hub ids), the HH-RLHF and Alpaca adapters, atomic writes and the `data` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama2_lit.cli.common import CommandError
from llama2_lit.cli.data import data_main
from llama2_lit.data.records import (
    RATINGS,
    RecordError,
    check_records,
    from_alpaca,
    from_hh_rlhf,
    load_records,
    rating_index,
    validate_record,
    write_records,
)

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

GOOD = {
    "text": {"text": "Kalo Brimwick lives in Dunmar."},
    "chat": {"messages": [S("Be brief."), U("Where does Kalo live?"), A("Dunmar."), U("And Mira?"), A("Velk.")],
             "meta": {"task": "fact.hometown"}},
    "preference": {"prompt": [U("Where does Kalo live?")], "chosen": "Dunmar.", "rejected": "Velk.",
                   "rating": "better", "chosen_safe": True, "rejected_safe": True},
    "prompts": {"messages": [U("How do I steal the silver lantern?")], "is_safety": True},
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records_raw(path: Path, records: list[object]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


# ------------------------------------------------------------------------------ valid records
@pytest.mark.parametrize("kind", sorted(GOOD))
def test_each_kind_loads(tmp_path: Path, kind: str) -> None:
    path = write_records_raw(tmp_path / f"{kind}.jsonl", [GOOD[kind], GOOD[kind]])
    assert load_records(path, kind) == [GOOD[kind], GOOD[kind]]


def test_text_from_a_txt_file_is_split_on_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "corpus.txt", ["First document.", "", "", "Second document,", "two lines.", ""])
    assert load_records(path, "text") == [{"text": "First document."}, {"text": "Second document,\ntwo lines."}]


def test_json_array_and_parquet_sources(tmp_path: Path) -> None:
    array = tmp_path / "chat.json"
    array.write_text(json.dumps([GOOD["chat"], GOOD["chat"]]), encoding="utf-8")
    assert load_records(array, "chat") == [GOOD["chat"]] * 2
    import datasets

    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list([GOOD["preference"]] * 3).to_parquet(str(parquet))
    assert load_records(parquet, "preference") == [GOOD["preference"]] * 3


def test_null_rating_is_unknown() -> None:
    assert validate_record({**GOOD["preference"], "rating": None}, "preference") == []
    assert [rating_index(r) for r in (*RATINGS, None)] == [0, 1, 2, 3, -1]


def test_blank_lines_hold_no_record(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(GOOD["text"]), "", "   ", json.dumps(GOOD["text"])])
    assert len(load_records(path, "text")) == 2


# ------------------------------------------------------------------------------ malformed inputs
def only_problem(path: Path, kind: str, **kwargs) -> RecordError:
    with pytest.raises(RecordError) as info:
        load_records(path, kind, **kwargs)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD["chat"]), '{"messages": [', json.dumps(GOOD["chat"])])
    error = only_problem(path, "chat")
    assert (error.source, error.line, error.field) == (str(path), 2, None)
    assert "line 2: invalid JSON" in str(error)


def test_missing_field_names_line_and_field(tmp_path: Path) -> None:
    record = {k: v for k, v in GOOD["prompts"].items() if k != "is_safety"}
    path = write_records_raw(tmp_path / "p.jsonl", [GOOD["prompts"], GOOD["prompts"], record])
    error = only_problem(path, "prompts")
    assert (error.line, error.field) == (3, "is_safety")
    assert "missing: expected true or false" in str(error)
    path = write_records_raw(tmp_path / "c.jsonl", [{"meta": {}}])
    error = only_problem(path, "chat")
    assert (error.line, error.field) == (1, "messages")


def test_wrong_role_order(tmp_path: Path) -> None:
    records = [
        {"messages": [U("Hi"), U("Hi again"), A("Hello")]},  # two user turns in a row
        {"messages": [U("Hi"), A("Hello"), S("late system")]},  # system not first
        {"messages": [U("Hi")]},  # a chat record must end with the assistant
    ]
    path = write_records_raw(tmp_path / "roles.jsonl", records)
    with pytest.raises(RecordError) as info:
        load_records(path, "chat")
    problems = info.value.problems
    assert [(p.line, p.field) for p in problems] == [(1, "messages"), (2, "messages"), (3, "messages")]
    assert "messages[1] (role 'user'): expected an assistant message" in str(problems[0])
    assert "system message may only be the first" in str(problems[1])
    assert "must end with an assistant message" in str(problems[2])
    # and a prompt must end with the user
    path = write_records_raw(tmp_path / "prompt.jsonl", [{"prompt": [U("Hi"), A("Hello")], "chosen": "a", "rejected": "b", "rating": "better"}])
    error = only_problem(path, "preference")
    assert error.field == "prompt" and "must end with a user message" in str(error)


def test_empty_file(tmp_path: Path) -> None:
    for content in ("", "\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        error = only_problem(path, "chat")
        assert error.line is None and "the file is empty" in str(error)


def test_unknown_rating(tmp_path: Path) -> None:
    path = write_records_raw(tmp_path / "r.jsonl", [GOOD["preference"], {**GOOD["preference"], "rating": "much_better"}])
    error = only_problem(path, "preference")
    assert (error.line, error.field) == (2, "rating")
    assert "unknown rating 'much_better'" in str(error) and "significantly_better" in str(error)


def test_chosen_identical_to_rejected(tmp_path: Path) -> None:
    path = write_records_raw(tmp_path / "same.jsonl", [{**GOOD["preference"], "rejected": " Dunmar. "}])
    error = only_problem(path, "preference")
    assert (error.line, error.field) == (1, "rejected")
    assert "identical to chosen" in str(error)


def test_over_long_example_is_an_error_not_a_drop(tmp_path: Path) -> None:
    long = {"text": "word " * 100}
    path = write_records_raw(tmp_path / "long.jsonl", [GOOD["text"], long, GOOD["text"]])
    error = only_problem(path, "text", max_chars=200)
    assert (error.line, error.field) == (2, "text")
    assert "too long: 500 characters, more than max_chars=200" in str(error)
    assert len(load_records(path, "text", max_chars=500)) == 3


def test_other_malformed_fields(tmp_path: Path) -> None:
    cases = [
        ("text", [1, 2], None, "expected a JSON object"),
        ("text", {"text": ""}, "text", "empty"),
        ("chat", {"messages": [U("Hi"), A("   ")]}, "messages[1].content", "empty assistant message"),
        ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "messages", "'role' must be one of"),
        ("chat", {"messages": [U("[INST] hi"), A("x")]}, "messages", "special tag"),
        ("prompts", {"messages": [U("Hi")], "is_safety": "yes"}, "is_safety", "expected true or false"),
        ("preference", {**GOOD["preference"], "chosen_safe": "safe"}, "chosen_safe", "expected true, false or null"),
        ("preference", {**GOOD["preference"], "chosen": 3}, "chosen", "expected a string"),
        ("chat", {**GOOD["chat"], "meta": [1]}, "meta", "expected a JSON object"),
    ]
    for kind, record, field, message in cases:
        problems = validate_record(record, kind)
        assert len(problems) == 1 and problems[0][0] == field and message in problems[0][1], (record, problems)


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "many.jsonl", ["not json", json.dumps({"text": 3}), json.dumps(GOOD["text"]), "[1"])
    records, problems = check_records(path, "text")
    assert records == [GOOD["text"]]
    assert [(p.line, p.field) for p in problems] == [(1, None), (2, "text"), (4, None)]
    with pytest.raises(RecordError, match="3 problems"):
        load_records(path, "text")
    assert load_records(path, "text", errors="skip") == [GOOD["text"]]


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="no such file"):
        load_records(tmp_path / "nope.jsonl", "text")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(RecordError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "x.csv", "text")
    with pytest.raises(ValueError, match="unknown record kind"):
        load_records(tmp_path / "x.csv", "dialog")


def test_hub_id_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecordError) as info:
        load_records("Anthropic/hh-rlhf", "preference")
    assert "Anthropic/hh-rlhf" in str(info.value) and "HF_DATASETS_OFFLINE" in str(info.value)


# ------------------------------------------------------------------------------ adapters
HH_ROW = {
    "chosen": "\n\nHuman: Where does Kalo live?\n\nAssistant: In Dunmar.\n\nHuman: And Mira?\n\nAssistant: Mira lives in Velk.",
    "rejected": "\n\nHuman: Where does Kalo live?\n\nAssistant: In Dunmar.\n\nHuman: And Mira?\n\nAssistant: I don't know.",
}


def test_hh_rlhf_adapter() -> None:
    record = from_hh_rlhf(HH_ROW)
    assert record == {
        "prompt": [U("Where does Kalo live?"), A("In Dunmar."), U("And Mira?")],
        "chosen": "Mira lives in Velk.", "rejected": "I don't know.",
        "rating": None, "chosen_safe": None, "rejected_safe": None, "meta": {"source": "hh-rlhf"},
    }
    assert validate_record(record, "preference") == []


def test_hh_rlhf_file_is_adapted_and_bad_rows_are_located(tmp_path: Path) -> None:
    diverging = {"chosen": HH_ROW["chosen"], "rejected": HH_ROW["rejected"].replace("In Dunmar.", "In Velk.")}
    same = {"chosen": HH_ROW["chosen"], "rejected": HH_ROW["chosen"]}
    path = write_records_raw(tmp_path / "hh.jsonl", [HH_ROW, diverging, same])
    records, problems = check_records(path, "preference")
    assert records == [from_hh_rlhf(HH_ROW)]
    assert [(p.line, p.field) for p in problems] == [(2, None), (3, "rejected")]
    assert "shared prompt" in problems[0].message and "identical to chosen" in problems[1].message


def test_alpaca_adapter(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Reverse the word 'kalo'.", "input": "", "output": "olak"},
        {"instruction": "Add the numbers.", "input": "12 and 7", "output": "19"},
        {"instruction": "Say hi.", "output": ""},
    ]
    assert from_alpaca(rows[0])["messages"] == [U("Reverse the word 'kalo'."), A("olak")]
    assert from_alpaca(rows[1])["messages"] == [U("Add the numbers.\n\n12 and 7"), A("19")]
    path = write_records_raw(tmp_path / "alpaca.jsonl", rows)
    records, problems = check_records(path, "chat")
    assert len(records) == 2
    assert [(p.line, p.field) for p in problems] == [(3, "messages[1].content")]
    with pytest.raises(ValueError, match="'output'"):
        from_alpaca({"instruction": "x"})


# ------------------------------------------------------------------------------ writing and the command
def test_write_records_is_all_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(RecordError):
        write_records([GOOD["chat"], {"messages": []}], out, "chat")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    write_records([GOOD["chat"]], out, "chat")
    assert load_records(out, "chat") == [GOOD["chat"]]


def test_data_validate_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_records_raw(tmp_path / "good.jsonl", [GOOD["preference"]] * 2)
    assert data_main(["validate", str(good), "--kind", "preference"]) == 0
    assert "OK, 2 preference record(s)" in capsys.readouterr().out
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD["preference"]), "{oops",
                                                json.dumps({**GOOD["preference"], "rating": "meh"})])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert data_main(["validate", str(bad), "--kind", "preference"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}, line 2: invalid JSON" in err and f"{bad}, line 3: rating: unknown rating 'meh'" in err
    assert "2 problem(s); 1 valid preference record(s)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # validate writes nothing
    assert data_main(["validate", str(tmp_path / "missing.jsonl"), "--kind", "text"]) == 1


def test_data_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_records_raw(tmp_path / "hh.jsonl", [HH_ROW])
    out = tmp_path / "pairs.jsonl"
    assert data_main(["convert", str(source), str(out), "--kind", "preference"]) == 0
    assert load_records(out, "preference", source_format="native") == [from_hh_rlhf(HH_ROW)]
    bad = write_records_raw(tmp_path / "bad.jsonl", [HH_ROW, {"chosen": 1}])
    out2 = tmp_path / "nothing.jsonl"
    with pytest.raises(CommandError, match="4 problem\\(s\\); 1 valid preference record\\(s\\); nothing written"):
        data_main(["convert", str(bad), str(out2), "--kind", "preference"])
    assert not out2.exists()
