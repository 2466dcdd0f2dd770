"""Generation for RL: padded batches of prompts, several samples per prompt, resumable seeds."""

from __future__ import annotations

import pytest
import torch

from llama2_lit.data.datamodules import collate_prompts
from llama2_lit.generation import SampleSeeds, generate, sample_seed
from llama2_lit.tokenizer import pad_batch
from test_generation import PROMPTS, tiny_model

SETTINGS = dict(max_new_tokens=9, temperature=0.9, top_p=0.95, eos_id=None)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model()


def prompt_batch() -> dict:
    """PROMPTS as ``PromptsDataModule`` collates them (left-padded ids and mask, plus metadata)."""
    examples = [{"input_ids": torch.tensor(p), "is_safety": i == 1, "messages": [], "meta": {"id": f"p{i}"}}
                for i, p in enumerate(PROMPTS)]
    return collate_prompts(examples)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_with_n_samples_per_prompt_equals_each_prompt_alone(model, side):
    n = 3
    seeds = SampleSeeds(seed=5)
    keys = ["p0", "p1", "p2"]
    ids, mask = pad_batch(PROMPTS, side=side, pad_value=0)
    batched = generate(model, ids, attention_mask=mask, num_samples=n, generator=seeds(keys, n), **SETTINGS)
    assert batched.batch_size == len(PROMPTS) * n and batched.num_samples == n
    assert batched.prompt_tokens() == [p for p in PROMPTS for _ in range(n)]
    for i, (prompt, key) in enumerate(zip(PROMPTS, keys)):
        alone = generate(model, [prompt], num_samples=n, generator=seeds([key], n), **SETTINGS)
        rows = slice(i * n, (i + 1) * n)
        assert batched.response_ids[rows].tolist() == alone.response_ids.tolist()
        assert (batched.logprobs[rows] - alone.logprobs).abs().max().item() <= 1e-5
        for j in range(n):  # and each sample alone, with its own seed
            single = generate(model, [prompt], generator=[sample_seed(5, 0, key, j)], **SETTINGS)
            assert batched.response_ids[i * n + j].tolist() == single.response_ids[0].tolist()
    samples = {tuple(row) for row in batched.response_ids.tolist()}
    assert len(samples) == len(PROMPTS) * n  # the samples of one prompt differ from each other


def test_a_prompts_datamodule_batch_is_accepted_as_it_comes(model):
    batch = prompt_batch()
    seeds = SampleSeeds(seed=1)
    keys = [meta["id"] for meta in batch["meta"]]
    out = generate(model, batch, num_samples=2, generator=seeds(keys, 2), **SETTINGS)
    expected = generate(model, PROMPTS, num_samples=2, generator=seeds(keys, 2), **SETTINGS)
    assert torch.equal(out.response_ids, expected.response_ids)
    greedy = generate(model, batch, num_samples=2, **{**SETTINGS, "temperature": 0.0})
    assert torch.equal(greedy.response_ids[0::2], greedy.response_ids[1::2])  # greedy samples are all alike


def test_restored_seeds_draw_the_same_samples_and_new_rounds_fresh_ones(model, tmp_path):
    keys = [10, 11, 12]
    seeds = SampleSeeds(seed=3)
    first = generate(model, PROMPTS, num_samples=2, generator=seeds(keys, 2), **SETTINGS)
    seeds.next_round()
    torch.save({"sample_seeds": seeds.state_dict()}, tmp_path / "state.pt")  # e.g. inside a checkpoint
    second = generate(model, PROMPTS, num_samples=2, generator=seeds(keys, 2), **SETTINGS)

    resumed = SampleSeeds()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["sample_seeds"])
    assert resumed == SampleSeeds(seed=3, round=1)
    again = generate(model, PROMPTS, num_samples=2, generator=resumed(keys, 2), **SETTINGS)
    assert torch.equal(again.response_ids, second.response_ids) and torch.equal(again.logprobs, second.logprobs)
    assert not torch.equal(first.response_ids, second.response_ids)
    # A prompt's samples do not depend on which other prompts share its batch.
    part = generate(model, PROMPTS[1:], num_samples=2, generator=resumed(keys[1:], 2), **SETTINGS)
    assert torch.equal(part.response_ids, second.response_ids[2:])


def test_sample_seeds_are_fixed_numbers():
    # Pinned: a seed depends on (seed, round, key, sample) only, identically on every platform and
    # Python version, so checkpoints written elsewhere resume to the same samples.
    assert sample_seed(0, 0, 0, 0) == sample_seed(0, 0, 0, 0)
    assert len({sample_seed(0, r, k, j) for r in range(3) for k in (0, 1, "0") for j in range(3)}) == 27
    assert SampleSeeds(seed=0)([0, "a"], 2) == [sample_seed(0, 0, 0, 0), sample_seed(0, 0, 0, 1),
                                               sample_seed(0, 0, "a", 0), sample_seed(0, 0, "a", 1)]
    assert 0 <= sample_seed(2**40, 7, "x", 3) < 2**63


def test_bad_batches_are_clear_errors(model):
    ids, mask = pad_batch(PROMPTS, side="left")
    holes = mask.clone()
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="row 0 of attention_mask has padding between real tokens"):
        generate(model, ids, attention_mask=holes, **SETTINGS)
    with pytest.raises(ValueError, match="differ in shape"):
        generate(model, ids, attention_mask=mask[:, 1:], **SETTINGS)
    with pytest.raises(ValueError, match="got 3 per-row seeds for 3 prompts x 2 samples"):
        generate(model, ids, attention_mask=mask, num_samples=2, generator=[1, 2, 3], **SETTINGS)
    with pytest.raises(ValueError, match="not both"):
        generate(model, {"input_ids": ids, "attention_mask": mask}, attention_mask=mask, **SETTINGS)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, ids[:2], attention_mask=torch.cat([mask[:1], torch.zeros_like(mask[:1])]), **SETTINGS)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        generate(model, PROMPTS, num_samples=0, **SETTINGS)
