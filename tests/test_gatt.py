"""Ghost Attention data construction (paper section 3.3) and safety context distillation's keep
rule (section 4.2.4, Fig 16b), checked token by token."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llama2_lit.chat import encode_dialog, encode_prompt
from llama2_lit.config import ModelConfig
from llama2_lit.data.records import validate_record
from llama2_lit.model import Transformer
from llama2_lit.sampling.context_distillation import (CATEGORY_TEMPLATES, GENERIC_PREPROMPT, distill_safety_context,
                                                      keep_distilled, safety_preprompt, with_preprompt)
from llama2_lit.sampling.gatt import (gatt_dialogs, instructed_user_message, sampling_messages,
                                      synthesize_gatt_data, training_messages)
from llama2_lit.reward_metrics import score_responses
from llama2_lit.tokenizer import Tokenizer, train_tokenizer

INSTRUCTION = "Figure: Duchess Landma."
USERS = ["What is 32 + 99?", "Now multiply that by 2.", "Where does Bob live?"]
ANSWERS = ["Hark! 32 + 99 = 131.", "Hark! 131 * 2 = 262.", "Hark! Bob lives in Rome."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    texts = [f"{name} has {n} apples and lives in {city}. Hark! Figure: Duchess Landma. What is {n} + 99? "
             f"Now multiply that by 2. Where does {name} live?"
             for n in range(60) for name, city in (("Alice", "Paris"), ("Bob", "Rome"), ("Carol", "Oslo"))]
    return Tokenizer(train_tokenizer(None, tmp_path_factory.mktemp("tok") / "gatt.model", 320, texts=texts))


def tiny_model(vocab_size: int, *, scalar_head: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                         multiple_of=32, max_seq_len=512)
    return Transformer(config, lm_head=not scalar_head, scalar_head=scalar_head).eval()


def gatt_record(users=USERS, answers=ANSWERS) -> dict:
    messages = [{"role": "system", "content": "Act as Duchess Landma: always begin your reply with \"Hark!\"."}]
    for user, answer in zip(users, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    meta = {"category": "task", "constraints": [{"type": "persona", "figure": "Duchess Landma", "greeting": "Hark!"}],
            "system_full": messages[0]["content"], "system_short": INSTRUCTION}
    return {"messages": messages, "meta": meta}


def exchange_ids(tokenizer: Tokenizer, user: str, answer: str | None) -> list[int]:
    """Meta's ids of one exchange (``llama/generation.py`` chat_completion), built by hand."""
    if answer is None:
        return [tokenizer.bos_id, *tokenizer.encode(f"[INST] {user.strip()} [/INST]", bos=False, eos=False)]
    return [tokenizer.bos_id, *tokenizer.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=False,
                                                eos=False), tokenizer.eos_id]


def system_first(user: str, system: str) -> str:
    return f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"


# ------------------------------------------------------------------------------------ GAtt data
def test_sampling_dialog_carries_the_instruction_on_every_user_turn(tokenizer):
    messages = sampling_messages(INSTRUCTION, USERS, ANSWERS[:2])
    ids = encode_prompt(tokenizer, messages)
    expected = (exchange_ids(tokenizer, system_first(USERS[0], INSTRUCTION), ANSWERS[0])
                + exchange_ids(tokenizer, instructed_user_message(INSTRUCTION, USERS[1]), ANSWERS[1])
                + exchange_ids(tokenizer, instructed_user_message(INSTRUCTION, USERS[2]), None))
    assert ids == expected
    assert [m["content"].startswith(INSTRUCTION) for m in messages if m["role"] == "user"] == [False, True, True]


def test_training_dialog_keeps_the_instruction_in_the_first_turn_and_the_loss_on_the_last_answer(tokenizer):
    encoded = encode_dialog(tokenizer, training_messages(INSTRUCTION, USERS, ANSWERS), loss_on="last_assistant")
    first = exchange_ids(tokenizer, system_first(USERS[0], INSTRUCTION), ANSWERS[0])
    second = exchange_ids(tokenizer, USERS[1], ANSWERS[1])  # no instruction in later turns
    last = exchange_ids(tokenizer, USERS[2], ANSWERS[2])
    assert encoded.ids == first + second + last
    last_prompt = len(exchange_ids(tokenizer, USERS[2], None))
    # Loss zero on every token of earlier turns, assistant answers included; one on the last answer,
    # its trailing space piece and EOS.
    assert encoded.loss_mask == [0] * (len(first) + len(second) + last_prompt) + [1] * (len(last) - last_prompt)
    instruction_ids = tokenizer.encode(INSTRUCTION, bos=False, eos=False)[1:]  # without the leading "▁" piece
    joined = " ".join(map(str, encoded.ids))
    assert joined.count(" ".join(map(str, instruction_ids))) == 1


def test_half_of_the_dialogs_take_the_short_instruction():
    dialogs = gatt_dialogs([gatt_record()] * 400, seed=3)
    short = [d for d in dialogs if d.short]
    assert 0.43 < len(short) / len(dialogs) < 0.57
    assert {d.instruction for d in short} == {INSTRUCTION}
    assert {d.instruction for d in dialogs if not d.short} == {gatt_record()["messages"][0]["content"]}
    assert gatt_dialogs([gatt_record()] * 400, seed=3)[7].short == dialogs[7].short  # seeded


def test_gatt_dialogs_reject_a_record_without_system_message():
    record = gatt_record()
    record["messages"] = record["messages"][1:]
    with pytest.raises(ValueError, match="record 2: .*system message"):
        gatt_dialogs([gatt_record(), record])


def test_synthesis_samples_turn_by_turn_deterministically_and_filters_on_the_last_answer(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    records = [gatt_record(), gatt_record(USERS[:2], ANSWERS[:2]), gatt_record()]
    kept_all, summary = synthesize_gatt_data(model, tokenizer, records, max_new_tokens=8, require_adherence=False,
                                             seed=1, batch_size=2)
    again, _ = synthesize_gatt_data(model, tokenizer, records[::-1][::-1], max_new_tokens=8,
                                    require_adherence=False, seed=1, batch_size=3)
    assert [r["messages"] for r in kept_all] == [r["messages"] for r in again]  # batching changes nothing
    assert summary["dialogs"] == summary["kept"] == 3
    for record, source in zip(kept_all, records):
        validate_record(record, "chat")
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert users == [m["content"] for m in source["messages"] if m["role"] == "user"]
        assert len(record["meta"]["gatt"]["adherent"]) == len(users)
    # A random model never greets with "Hark!": the adherence filter drops every dialog.
    filtered, summary = synthesize_gatt_data(model, tokenizer, records, max_new_tokens=8, seed=1)
    assert filtered == [] and summary["kept"] == 0
    assert summary["sample_adherence_by_turn"] == {1: 0.0, 2: 0.0, 3: 0.0}


def test_a_dialog_ends_at_its_first_empty_answer(tokenizer):
    """A model that answers every prompt with EOS at once gives no answer at turn 1: each dialog
    ends before it and is dropped, and the summary says so (no empty chat turns are written)."""
    model = tiny_model(tokenizer.vocab_size)
    with torch.no_grad():  # the residual stream is the token's embedding, the same for every token
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.fill_(1.0)
        model.output.weight.zero_()
        model.output.weight[tokenizer.eos_id] = 100.0
    records, summary = synthesize_gatt_data(model, tokenizer, [gatt_record(), gatt_record()], max_new_tokens=4,
                                            require_adherence=False)
    assert records == [] and summary["kept"] == 0 and summary["ended_at_empty_answer"] == 2
    assert summary["sample_adherence_by_turn"] == {}


# ------------------------------------------------------------------------------------ context distillation
def test_keep_rule_keeps_only_strict_improvements():
    with_pre = torch.tensor([0.9, 0.4, 0.5, 0.2])
    without = torch.tensor([0.3, 0.6, 0.5, 0.1])
    assert keep_distilled(with_pre, without).tolist() == [True, False, False, True]


def test_preprompts_follow_the_templates():
    rng = random.Random(0)
    drawn = [safety_preprompt(rng, "unqualified_advice") for _ in range(200)]
    assert 20 < drawn.count(GENERIC_PREPROMPT) < 80
    assert all(CATEGORY_TEMPLATES["unqualified_advice"] in p for p in drawn if p != GENERIC_PREPROMPT)
    assert with_preprompt([{"role": "user", "content": "hi"}], "Be safe.")[0] == {"role": "system", "content": "Be safe."}
    merged = with_preprompt([{"role": "system", "content": "Hobby: chess."}, {"role": "user", "content": "hi"}], "Be safe.")
    assert merged[0]["content"] == "Be safe. Hobby: chess." and len(merged) == 2


def test_distillation_trains_without_the_preprompt_and_keeps_what_the_safety_rm_prefers(tokenizer):
    model, safety_rm = tiny_model(tokenizer.vocab_size), tiny_model(tokenizer.vocab_size, scalar_head=True, seed=1)
    records = [{"messages": [{"role": "user", "content": f"Where does {name} live?"}], "is_safety": True,
                "meta": {"risk_category": "illicit_criminal"}} for name in ("Alice", "Bob", "Carol", "Bob", "Alice")]
    out, summary = distill_safety_context(model, safety_rm, tokenizer, records, max_new_tokens=6, seed=2,
                                          batch_size=2)
    kept = torch.tensor(summary["score_with"]) > torch.tensor(summary["score_without"])
    assert summary["kept_mask"] == kept.tolist() and summary["kept"] == len(out) == int(kept.sum())
    kept_records = [r for r, k in zip(records, kept.tolist()) if k]
    for record, source in zip(out, kept_records):
        validate_record(record, "chat")
        assert record["messages"][:-1] == source["messages"]  # trained without the preprompt
        cd = record["meta"]["context_distillation"]
        assert cd["score_with"] > cd["score_without"]
        # The stored score is the safety RM's score of exactly this training pair.
        rescored = torch.sigmoid(score_responses(safety_rm, tokenizer, [source["messages"]],
                                                 [record["messages"][-1]["content"]]))
        assert rescored.item() == pytest.approx(cd["score_with"], abs=1e-6)


# ------------------------------------------------------------------------------------ the verbs
def test_gatt_and_distill_verbs_write_the_stages_data(tokenizer, tmp_path, capsys):
    """`llama2-lit gatt` and `llama2-lit distill` run the pipeline's data stages on any checkpoint."""
    from llama2_lit.checkpoints import save_model
    from llama2_lit.cli import run_verb
    from llama2_lit.data.records import load_records, write_records

    policy, safety_rm = tiny_model(tokenizer.vocab_size), tiny_model(tokenizer.vocab_size, scalar_head=True, seed=1)
    policy_dir = save_model(policy, policy.config, tmp_path / "policy", tokenizer_path=tokenizer.path)
    rm_dir = save_model(safety_rm, safety_rm.config, tmp_path / "rm", tokenizer_path=tokenizer.path)
    write_records([gatt_record(), gatt_record(USERS[:2], ANSWERS[:2])], tmp_path / "dialogs.jsonl", "chat")
    assert run_verb("gatt", [str(policy_dir), "--dialogs", str(tmp_path / "dialogs.jsonl"), "--out", str(tmp_path / "g"),
                 "--keep-all", "--max-new-tokens", "4"]) == 0
    records = load_records(tmp_path / "g" / "train.jsonl", "chat")
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["dialogs"] == 2 and summary["kept"] == len(records) >= 2 - summary["ended_at_empty_answer"]
    assert all(r["messages"][0]["role"] == "system" for r in records)  # the instruction stays in the first turn

    prompts = [{"messages": [{"role": "user", "content": f"Where does {n} live?"}], "is_safety": s, "meta": {}}
               for n, s in (("Alice", True), ("Bob", False), ("Carol", True))]
    write_records(prompts, tmp_path / "prompts.jsonl", "prompts")
    code = run_verb("distill", [str(policy_dir), "--safety-rm", str(rm_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--out", str(tmp_path / "d"), "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["prompts"] == 2  # the safety prompts only
    assert len(load_records(tmp_path / "d" / "train.jsonl", "chat")) == summary["kept"] - summary["dropped_empty_answer"]
