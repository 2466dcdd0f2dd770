"""Generation: exact KV-cached decoding, Meta's sampling rule, EOS handling, PPO log-probs, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from llama2_lit.config import ModelConfig
from llama2_lit.generation import (
    GenerationOutput,
    draw_uniforms,
    generate,
    sample_next_token,
    sequence_logprobs,
    top_p_filter,
)
from llama2_lit.model import Transformer

VOCAB = 320
PROMPTS = [[1, 17, 42, 99, 5, 7, 250], [1, 8], [1, 300, 301, 4, 4]]  # ragged: left padding is exercised


def tiny_model(**overrides) -> Transformer:
    values = dict(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                  max_seq_len=64)
    values.update(overrides)
    return Transformer(ModelConfig(**values)).eval()


@pytest.fixture
def model() -> Transformer:
    return tiny_model()


def full_forward_decode(model: Transformer, prompt: list[int], steps: int, *, temperature: float = 0.0,
                        uniforms: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """Reference decoder: one full forward pass over the whole sequence per token, no cache, no padding."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for step in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            if temperature == 0:
                token = int(logits.argmax())
                logprobs.append(float(logits.log_softmax(-1)[token]))
            else:
                probs = (logits / temperature).softmax(-1)
                cdf = probs.cumsum(-1)
                token = int(torch.searchsorted(cdf, (1 - uniforms[step]) * cdf[-1]))
                logprobs.append(float((logits / temperature).log_softmax(-1)[token]))
            ids.append(token)
    return ids[len(prompt):], logprobs


def response_lists(out: GenerationOutput) -> list[list[int]]:
    return out.response_tokens(include_eos=True)


# ------------------------------------------------------------------------------------ exactness
def test_greedy_with_cache_equals_full_forward_decoding_token_for_token(model):
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=None)
    assert out.response_ids.shape == (3, 12)
    for row, prompt in enumerate(PROMPTS):
        tokens, logprobs = full_forward_decode(model, prompt, 12)
        assert out.response_ids[row].tolist() == tokens
        assert (out.logprobs[row] - torch.tensor(logprobs)).abs().max().item() <= 1e-5


def test_sampling_with_cache_equals_full_forward_sampling_with_the_same_uniforms(model):
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0.8, top_p=1.0, eos_id=None, generator=[3, 4, 5])
    uniforms = draw_uniforms([3, 4, 5], 3, 10)
    for row, prompt in enumerate(PROMPTS):
        tokens, logprobs = full_forward_decode(model, prompt, 10, temperature=0.8, uniforms=uniforms[row])
        assert out.response_ids[row].tolist() == tokens
        assert (out.logprobs[row] - torch.tensor(logprobs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batch_of_ragged_prompts_equals_each_prompt_alone(model, temperature):
    seeds = [11, 22, 33]
    batched = generate(model, PROMPTS, max_new_tokens=10, temperature=temperature, top_p=1.0, eos_id=None,
                       generator=seeds)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], max_new_tokens=10, temperature=temperature, top_p=1.0, eos_id=None,
                         generator=[seeds[row]])
        assert batched.response_ids[row].tolist() == alone.response_ids[0].tolist()
        assert (batched.logprobs[row] - alone.logprobs[0]).abs().max().item() <= 1e-5
    if temperature > 0:  # the rows really sample different things
        assert len({tuple(r) for r in batched.response_ids.tolist()}) == 3


def test_prompt_layout_and_sequences_are_left_padded_prompt_then_right_padded_response(model):
    out = generate(model, PROMPTS, max_new_tokens=4, temperature=0.0, eos_id=None)
    assert out.prompt_ids.shape == (3, 7)
    assert out.prompt_lengths.tolist() == [7, 2, 5]
    assert out.prompt_mask.tolist() == [[1] * 7, [0] * 5 + [1] * 2, [0] * 2 + [1] * 5]
    assert out.prompt_tokens() == PROMPTS
    assert out.prompt_ids[1].tolist() == [0, 0, 0, 0, 0, 1, 8]
    input_ids, attention_mask, response_mask = out.sequences()
    assert input_ids.shape == attention_mask.shape == response_mask.shape == (3, 11)
    assert input_ids[:, 7:].tolist() == out.response_ids.tolist()
    assert response_mask.tolist() == [[0] * 7 + [1] * 4] * 3
    assert attention_mask[1].tolist() == [0] * 5 + [1] * 6


# ------------------------------------------------------------------------------------ EOS
def test_eos_stops_each_row_and_nothing_after_eos_is_counted(model):
    # A random model rarely picks any particular token, so EOS is chosen among tokens the model does
    # emit: the token row 1 emits at step 2 (greedy decoding is deterministic).
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=None)
    eos = int(free.response_ids[1, 2])
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=eos)
    expected_lengths = []
    for row in range(3):
        tokens = free.response_ids[row].tolist()
        length = tokens.index(eos) + 1 if eos in tokens else 12
        expected_lengths.append(length)
        assert out.response_ids[row, :length].tolist() == tokens[:length]
        assert out.response_ids[row, length:].eq(0).all()
        assert out.logprobs[row, :length].tolist() == pytest.approx(free.logprobs[row, :length].tolist(), abs=1e-6)
        assert out.logprobs[row, length:].eq(0).all()
        assert out.response_mask[row].tolist() == [1] * length + [0] * (out.response_ids.shape[1] - length)
        assert bool(out.eos_emitted[row]) == (eos in tokens)
    assert out.response_lengths.tolist() == expected_lengths
    assert expected_lengths[1] <= 3 and max(expected_lengths) == 12, "the test needs one early stop and one truncation"
    assert out.response_ids.shape[1] == max(expected_lengths)
    assert response_lists(out)[1][-1] == eos
    assert out.response_tokens()[1] == response_lists(out)[1][:-1]  # EOS dropped for decoding


def eos_prone_model(eos_id: int, eos_logit: float) -> Transformer:
    """A random model whose EOS logit is about ``eos_logit`` at every position (others are ~0).

    A constant feature in every embedding survives to the final norm; the EOS row of the output
    head reads only that feature.
    """
    model = tiny_model()
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] = 1.0
        feature = model.hidden_states(torch.tensor([PROMPTS[0]]))[0, :, 0].mean()
        model.output.weight[eos_id] = 0.0
        model.output.weight[eos_id, 0] = eos_logit / feature
    return model


def test_generation_stops_when_every_row_has_emitted_eos():
    model = eos_prone_model(eos_id=5, eos_logit=5.0)  # p(EOS) ~ 0.3 per step: rows stop at different steps
    out = generate(model, PROMPTS, max_new_tokens=30, temperature=1.0, top_p=1.0, eos_id=5, generator=0)
    assert out.eos_emitted.all()
    lengths = out.response_lengths.tolist()
    assert len(set(lengths)) > 1 and out.response_ids.shape[1] == max(lengths) < 30
    for row, length in enumerate(lengths):
        assert out.response_ids[row, length - 1] == 5 and 5 not in out.response_ids[row, :length - 1].tolist()
        assert out.response_mask[row].sum() == length


def test_dropping_finished_rows_from_the_batch_changes_nothing():
    model = eos_prone_model(eos_id=5, eos_logit=3.0)
    prompts = PROMPTS * 3  # 9 rows, so the batch shrinks several times
    kept = generate(model, prompts, max_new_tokens=24, temperature=1.0, top_p=1.0, eos_id=5, generator=4,
                    drop_finished=False)
    dropped = generate(model, prompts, max_new_tokens=24, temperature=1.0, top_p=1.0, eos_id=5, generator=4)
    assert len(set(kept.response_lengths.tolist())) >= 4, "the test needs ragged lengths"
    for name in ("response_ids", "response_mask", "response_lengths", "eos_emitted"):
        assert torch.equal(getattr(kept, name), getattr(dropped, name)), name
    assert (kept.logprobs - dropped.logprobs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("interval", [2, 5])
def test_checking_for_the_end_every_few_steps_changes_nothing(model, interval):
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=None)
    eos = int(free.response_ids[1, 2])
    every_step = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=eos, stop_check_interval=1)
    sparse = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=eos, stop_check_interval=interval)
    for name in ("response_ids", "response_mask", "logprobs", "response_lengths", "eos_emitted"):
        assert torch.equal(getattr(every_step, name), getattr(sparse, name)), name


def test_sampled_rows_stop_at_eos_and_match_the_run_without_eos_up_to_it(model):
    # Each (row, step) has its own uniform number, so stopping one row changes nothing in the others.
    free = generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, top_p=1.0, eos_id=None, generator=7)
    eos = int(free.response_ids[0, 3])
    out = generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, top_p=1.0, eos_id=eos, generator=7)
    for row in range(3):
        tokens = free.response_ids[row].tolist()
        length = tokens.index(eos) + 1 if eos in tokens else 16
        assert out.response_lengths[row] == length
        assert out.response_ids[row, :length].tolist() == tokens[:length]
    assert out.response_lengths[0] <= 4


# ------------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_a_single_forward_pass_over_the_finished_sequences(model, temperature):
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=temperature, top_p=1.0, eos_id=None, generator=1)
    eos = int(free.response_ids[2, 4])
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=temperature, top_p=1.0, eos_id=eos, generator=1)
    assert out.logprob_temperature == (temperature if temperature > 0 else 1.0)
    input_ids, attention_mask, response_mask = out.sequences()
    with torch.no_grad():
        recomputed = sequence_logprobs(model, input_ids, attention_mask, response_mask=response_mask,
                                       temperature=out.logprob_temperature)
    prompt_len = out.prompt_ids.shape[1]
    assert recomputed[:, :prompt_len].eq(0).all()
    assert (recomputed[:, prompt_len:] - out.logprobs).abs().max().item() <= 1e-5
    assert out.logprobs[out.response_mask.bool()].lt(0).all()
    # The same numbers from prompt lengths instead of a response mask:
    with torch.no_grad():
        by_length = sequence_logprobs(model, input_ids, attention_mask, prompt_lengths=out.prompt_lengths,
                                      temperature=out.logprob_temperature)
    assert torch.equal(by_length, recomputed)


def test_sequence_logprobs_works_on_right_padded_prompt_plus_response_rows(model):
    out = generate(model, PROMPTS, max_new_tokens=6, temperature=0.7, top_p=1.0, eos_id=None, generator=2)
    rows = [p + r for p, r in zip(out.prompt_tokens(), response_lists(out))]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        logprobs = sequence_logprobs(model, ids, mask, prompt_lengths=out.prompt_lengths, temperature=0.7)
    for row, prompt in enumerate(PROMPTS):
        got = logprobs[row, len(prompt):len(prompt) + 6]
        assert (got - out.logprobs[row]).abs().max().item() <= 1e-5
        assert logprobs[row, :len(prompt)].eq(0).all() and logprobs[row, len(prompt) + 6:].eq(0).all()


def test_outputs_are_ordinary_tensors_that_feed_a_training_forward(model):
    out = generate(model, PROMPTS, max_new_tokens=4, temperature=1.0, top_p=1.0, eos_id=None, generator=0)
    assert not any(t.is_inference() for t in (out.response_ids, out.logprobs, out.prompt_ids, out.response_mask))
    input_ids, attention_mask, response_mask = out.sequences()
    logprobs = sequence_logprobs(model, input_ids, attention_mask, response_mask=response_mask)
    ratio = (logprobs - torch.cat([torch.zeros_like(out.prompt_mask), out.logprobs], 1)).exp()
    (ratio * response_mask).sum().backward()  # PPO's first minibatch: ratio == 1 exactly where it counts
    assert model.output.weight.grad is not None
    assert (ratio[response_mask.bool()] - 1).abs().max().item() <= 1e-5


def test_sequence_logprobs_rejects_ambiguous_or_impossible_requests(model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="exactly one of"):
        sequence_logprobs(model, ids)
    with pytest.raises(ValueError, match="first position"):
        sequence_logprobs(model, ids, response_mask=torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sequence_logprobs(model, ids, prompt_lengths=torch.tensor([1]), temperature=0.0)


# ------------------------------------------------------------------------------------ sampling rule
def test_top_p_filter_is_metas_rule_on_a_hand_built_distribution():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    # sorted 0.4 0.25 0.2 0.1 0.05; mass before each: 0 0.4 0.65 0.85 0.95; > 0.7 -> drop 0.1 and 0.05
    expected = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.2]) / 0.85
    assert torch.allclose(top_p_filter(probs, 0.7), expected, atol=1e-7)
    # The crossing token is kept, even exactly at the boundary (exact binary fractions):
    probs = torch.tensor([0.0625, 0.5, 0.1875, 0.25])  # mass before each, sorted: 0 0.5 0.75 0.9375
    assert torch.equal(top_p_filter(probs, 0.75), torch.tensor([0.0, 0.5, 0.1875, 0.25]) / 0.9375)
    assert torch.equal(top_p_filter(probs, 0.74), torch.tensor([0.0, 0.5, 0.0, 0.25]) / 0.75)
    assert top_p_filter(probs, 1e-6).tolist() == [0.0, 1.0, 0.0, 0.0]  # the most likely token always stays
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    batch = torch.stack([probs, probs.flip(0)])  # rows are independent
    assert torch.equal(top_p_filter(batch, 0.75)[1], top_p_filter(probs.flip(0), 0.75))


@pytest.mark.parametrize("probs, temperature, top_p", [
    ([0.05, 0.4, 0.1, 0.25, 0.2], 1.0, 0.7),
    ([0.05, 0.4, 0.1, 0.25, 0.2], 1.0, 1.0),
    ([0.05, 0.4, 0.1, 0.25, 0.2], 0.5, 1.0),
    ([0.05, 0.4, 0.1, 0.25, 0.2], 0.5, 0.6),
    ([0.0625, 0.5, 0.1875, 0.25, 0.0], 1.0, 0.75),  # exact: the crossing token sits on the boundary
])
def test_sampler_draws_exactly_the_filtered_tempered_distribution(probs, temperature, top_p):
    # Evenly spaced uniforms make the inverse-CDF sampler's frequencies deterministic: each token's
    # share equals its probability up to 1/K.
    probs = torch.tensor(probs)
    k = 20_000
    logits = probs.log().expand(k, -1)
    uniforms = (torch.arange(k) + 0.5) / k
    tokens, logprobs = sample_next_token(logits, temperature=temperature, top_p=top_p, uniforms=uniforms)
    target = top_p_filter((probs.log() / temperature).softmax(-1), top_p)
    frequencies = torch.bincount(tokens, minlength=5).float() / k
    assert (frequencies - target).abs().max().item() <= 1.5 / k
    assert frequencies[target == 0].eq(0).all()  # nothing outside the nucleus, ever
    # Log-probs are of the full tempered distribution, not of the truncated one:
    full = (probs.log() / temperature).log_softmax(-1)
    assert torch.allclose(logprobs, full[tokens], atol=1e-6)


def test_sampler_never_draws_a_zero_probability_token_at_the_extremes_of_u():
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 1.0, -math.inf]] * 4)
    uniforms = torch.tensor([0.0, 1e-9, 0.999999, 1 - 2**-24])
    tokens, _ = sample_next_token(logits, temperature=1.0, top_p=1.0, uniforms=uniforms)
    assert set(tokens.tolist()) <= {1, 3}
    tokens, _ = sample_next_token(logits, temperature=1.0, top_p=0.5, uniforms=uniforms)
    assert tokens.tolist() == [3, 3, 3, 3]


def test_temperature_zero_is_greedy_with_untempered_logprobs():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    tokens, logprobs = sample_next_token(logits, temperature=0.0)
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(logprobs, logits.log_softmax(-1)[[0, 1], [1, 0]])


def test_temperature_zero_generation_ignores_the_seed(model):
    a = generate(model, PROMPTS, max_new_tokens=6, temperature=0.0, eos_id=None, generator=1)
    b = generate(model, PROMPTS, max_new_tokens=6, temperature=0.0, eos_id=None, generator=2)
    assert torch.equal(a.response_ids, b.response_ids)
    assert a.logprob_temperature == 1.0


# ------------------------------------------------------------------------------------ seeds
def test_seeded_runs_reproduce_and_do_not_touch_the_global_rng(model):
    state = torch.get_rng_state()
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None, generator=1234)
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None, generator=1234)
    c = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None, generator=1235)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    # A torch.Generator advances: two calls give fresh samples, a re-seeded one repeats them.
    g = torch.Generator().manual_seed(5)
    first = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None, generator=g)
    second = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None, generator=g)
    again = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None,
                     generator=torch.Generator().manual_seed(5))
    assert not torch.equal(first.response_ids, second.response_ids)
    assert torch.equal(first.response_ids, again.response_ids)


def test_generating_more_tokens_does_not_change_the_first_ones(model):
    short = generate(model, PROMPTS, max_new_tokens=5, temperature=1.0, eos_id=None, generator=[1, 2, 3])
    long = generate(model, PROMPTS, max_new_tokens=12, temperature=1.0, eos_id=None, generator=[1, 2, 3])
    assert torch.equal(short.response_ids, long.response_ids[:, :5])


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(ValueError, match="exceeds the context length of 64"):
        generate(model, [[1] * 60], max_new_tokens=5, eos_id=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=5, eos_id=2)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, VOCAB]], max_new_tokens=5, eos_id=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=5, top_p=0.0, eos_id=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], max_new_tokens=5, temperature=-1.0, eos_id=2)
    with pytest.raises(ValueError, match="3 per-row seeds for a batch of 2"):
        generate(model, [[1], [1]], max_new_tokens=5, eos_id=2, generator=[1, 2, 3])


# ------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random model saved in our format, with a small tokenizer trained beside it."""
    from llama2_lit.checkpoints import save_model
    from llama2_lit.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("generation_cli")
    words = ["the", "cat", "sat", "on", "a", "mat", "Paris", "is", "in", "France", "what", "where", "hello"]
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 5)) for i in range(300)]
    tokenizer = Tokenizer(train_tokenizer(None, root / "tok.model", 300, texts=texts))
    torch.manual_seed(0)
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=96)
    folder = save_model(model, model.config, root / "ckpt", tokenizer_path=tokenizer.path)
    return folder, model, tokenizer


def test_generate_command_prints_the_completions_of_generate(checkpoint, capsys):
    import json

    from llama2_lit.cli.generation import generate_main

    folder, model, tokenizer = checkpoint
    prompts = ["the cat sat", "where is Paris"]
    argv = [str(folder), "--json", "--temperature", "0.8", "--top-p", "0.95", "--seed", "3", "--max-new-tokens", "9"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert generate_main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    expected = generate(model, ids, max_new_tokens=9, temperature=0.8, top_p=0.95, eos_id=tokenizer.eos_id,
                        generator=3)
    assert [r["prompt"] for r in rows] == prompts
    assert [r["tokens"] for r in rows] == expected.response_tokens()
    assert [r["completion"] for r in rows] == [tokenizer.decode(i + t)[len(tokenizer.decode(i)):]
                                               for i, t in zip(ids, expected.response_tokens())]
    assert [r["eos"] for r in rows] == expected.eos_emitted.tolist()
    assert len(rows[0]["logprobs"]) == int(expected.response_lengths[0])

    # Plain output: the prompt followed by its continuation (text completion).
    assert generate_main([str(folder), "--prompt", "the cat sat", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    greedy = generate(model, ids[:1], max_new_tokens=5, temperature=0, eos_id=tokenizer.eos_id)
    assert capsys.readouterr().out == tokenizer.decode(ids[0] + greedy.response_tokens()[0]) + "\n"


def test_generate_command_chat_mode_uses_the_llama2_chat_prompt(checkpoint, capsys):
    from llama2_lit.chat import encode_prompt
    from llama2_lit.cli.generation import generate_main

    folder, model, tokenizer = checkpoint
    argv = [str(folder), "--chat", "--system", "be brief", "--prompt", "hello", "--temperature", "0",
            "--max-new-tokens", "6", "--tokenizer", str(tokenizer.path)]
    assert generate_main(argv) == 0
    prompt = encode_prompt(tokenizer, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    greedy = generate(model, [prompt], max_new_tokens=6, temperature=0, eos_id=tokenizer.eos_id)
    assert capsys.readouterr().out == tokenizer.decode(greedy.response_tokens()[0]) + "\n"


def test_chat_command_keeps_the_dialog_and_resets_it(checkpoint, capsys, monkeypatch):
    import io

    from llama2_lit.chat import encode_prompt
    from llama2_lit.cli.generation import chat_main

    folder, model, tokenizer = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nwhere is Paris\n/reset\nwhere is Paris\n/exit\nignored\n"))
    assert chat_main([str(folder), "--temperature", "0", "--max-new-tokens", "5", "--system", "sys"]) == 0
    out = capsys.readouterr().out

    def answer(messages):
        ids = encode_prompt(tokenizer, [{"role": "system", "content": "sys"}] + messages)
        greedy = generate(model, [ids], max_new_tokens=5, temperature=0, eos_id=tokenizer.eos_id)
        return tokenizer.decode(greedy.response_tokens()[0])

    first = answer([{"role": "user", "content": "hello"}])
    second = answer([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "where is Paris"}])
    third = answer([{"role": "user", "content": "where is Paris"}])
    assert out == f"{first}\n{second}\n{third}\n"


def test_chat_command_works_with_piped_stdin(checkpoint):
    import subprocess
    import sys

    folder, model, tokenizer = checkpoint
    result = subprocess.run([sys.executable, "-m", "llama2_lit", "chat", str(folder), "--temperature", "0",
                             "--max-new-tokens", "4", "--device", "cpu"],
                            input="hello\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from llama2_lit.chat import encode_prompt

    greedy = generate(model, [encode_prompt(tokenizer, [{"role": "user", "content": "hello"}])], max_new_tokens=4,
                      temperature=0, eos_id=tokenizer.eos_id)
    assert result.stdout == tokenizer.decode(greedy.response_tokens()[0]) + "\n"


def test_commands_explain_a_missing_tokenizer(checkpoint, tmp_path, capsys):
    from llama2_lit.checkpoints import save_model
    from llama2_lit.cli import main

    _, model, _ = checkpoint
    bare = save_model(model, model.config, tmp_path / "bare")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(bare), "--prompt", "hi"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"llama2-lit generate: error: {bare} holds no tokenizer.model; pass --tokenizer PATH\n"


def test_chat_command_survives_bad_turns_and_dialogs_longer_than_the_context(checkpoint, capsys, monkeypatch):
    import io

    from llama2_lit.chat import encode_prompt
    from llama2_lit.cli.generation import chat_main

    folder, model, tokenizer = checkpoint
    long_turn = "where is the cat that sat on a mat in Paris in France"  # ~25 tokens with the chat tags
    lines = ["[INST] sneaky", *[f"{long_turn} {i}" for i in range(4)]]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert chat_main([str(folder), "--temperature", "0", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "special tag '[INST]'" in captured.err
    dialog, expected = [], ""  # the bad turn gets no answer and leaves no trace in the dialog
    for i in range(4):
        dialog.append({"role": "user", "content": f"{long_turn} {i}"})
        prompt = encode_prompt(tokenizer, dialog, max_len=96 - 5)  # the context (96) minus the answer's room
        greedy = generate(model, [prompt], max_new_tokens=5, temperature=0, eos_id=tokenizer.eos_id)
        answer = tokenizer.decode(greedy.response_tokens()[0])
        expected += answer + "\n"
        dialog.append({"role": "assistant", "content": answer})
    assert captured.out == expected
    assert len(encode_prompt(tokenizer, dialog[:-1])) > 96 - 5, "the dialog must outgrow the context"


def test_commands_use_the_tokenizer_a_stage_checkpoint_records(checkpoint, tmp_path, capsys):
    """A stage's .ckpt records its tokenizer (StageModule.on_save_checkpoint): generate finds it and
    says so; convert copies it next to the weights, where loading our folder finds it again."""
    from llama2_lit.cli import main

    folder, model, tokenizer = checkpoint
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{name}": tensor for name, tensor in model.state_dict().items()},
                "model_config": model.config.to_dict(), "tokenizer_path": str(tokenizer.path)}, ckpt)
    greedy = generate(model, [tokenizer.encode("the cat", bos=True, eos=False)], max_new_tokens=4, temperature=0,
                      eos_id=tokenizer.eos_id)
    expected = tokenizer.decode(tokenizer.encode("the cat", bos=True, eos=False) + greedy.response_tokens()[0])

    def run(argv: list[str]) -> int:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        return exit_.value.code

    assert run(["generate", str(ckpt), "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert captured.err == f"note: tokenizer {tokenizer.path} (from {ckpt})\n"

    assert run(["convert", str(ckpt), str(tmp_path / "ours")]) == 0
    assert f"with the tokenizer {tokenizer.path}" in capsys.readouterr().out
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    assert run(["generate", str(tmp_path / "ours"), "--prompt", "the cat", "--temperature", "0",
                "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and f"tokenizer {tmp_path / 'ours' / 'tokenizer.model'}" in captured.err

    # A recorded tokenizer that is gone: one line saying which file and what to do.
    torch.save({**torch.load(ckpt, weights_only=True), "tokenizer_path": str(tmp_path / "gone.model")}, ckpt)
    assert run(["generate", str(ckpt), "--prompt", "the cat"]) == 2
    assert capsys.readouterr().err.startswith(
        f"llama2-lit generate: error: {ckpt} was trained with the tokenizer {tmp_path / 'gone.model'}, "
        "which does not exist")
