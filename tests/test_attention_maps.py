"""Attention probabilities recomputed from the model core's q/k (llama2_lit.attention_maps): they must
reproduce each block's attention output, and the system-message share must be exact where it is known."""

from __future__ import annotations

import pytest
import torch

from llama2_lit.attention_maps import attention_probabilities, dialog_positions, system_attention_by_turn
from llama2_lit.config import ModelConfig
from llama2_lit.model import Transformer
from llama2_lit.tokenizer import Tokenizer, train_tokenizer

SYSTEM = "Always answer in capital letters."
DIALOG = [{"role": "system", "content": SYSTEM},
          {"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19."},
          {"role": "user", "content": "Where does Bob live?"}, {"role": "assistant", "content": "BOB LIVES IN ROME."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    texts = [f"{name} lives in {city}. What is {n} + 7? Always answer in capital letters. {name.upper()} LIVES IN "
             f"{city.upper()}. Where does {name} live?" for n in range(40)
             for name, city in (("Bob", "Rome"), ("Alice", "Paris"))]
    return Tokenizer(train_tokenizer(None, tmp_path_factory.mktemp("tok") / "attn.model", 320, texts=texts))


def tiny_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(name="tiny", dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                         multiple_of=32, max_seq_len=256)
    return Transformer(config).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_probabilities_reproduce_every_blocks_attention_output(padded):
    model = tiny_model(100)
    tokens = torch.randint(3, 100, (2, 12))
    mask = None
    if padded:  # left padding in row 0: the model's own positions and padding mask apply
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[0, :4] = False
    inputs, outputs = [], []

    def keep(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    hooks = [layer.attention.register_forward_hook(keep) for layer in model.layers]
    with torch.no_grad():
        model(tokens, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    probabilities = attention_probabilities(model, tokens, attention_mask=mask)
    assert probabilities.shape == (3, 2, 4, 12, 12)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3, 2, 4, 12))
    assert probabilities[..., torch.ones(12, 12, dtype=torch.bool).triu(1)].abs().max() == 0  # causal
    if padded:
        assert probabilities[:, 0, :, 4:, :4].abs().max() == 0  # real tokens never read padding
    for layer, x, out, p in zip(model.layers, inputs, outputs, probabilities):
        attention = layer.attention
        v = attention.wv(x).view(2, 12, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
        v = v.repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=1)
        rebuilt = attention.wo((p @ v).transpose(1, 2).reshape(2, 12, -1))
        torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-4)


def test_dialog_positions_find_the_system_message_and_every_answer(tokenizer):
    ids, system, turns = dialog_positions(tokenizer, DIALOG)
    assert tokenizer.decode([ids[p] for p in system]).strip() == SYSTEM
    assert system == list(range(system[0], system[-1] + 1))
    assert len(turns) == 2
    for positions, answer in zip(turns, ("12 + 7 = 19.", "BOB LIVES IN ROME.")):
        assert ids[positions[-1]] == tokenizer.eos_id
        assert tokenizer.decode([ids[p] for p in positions[:-1]]).strip() == answer
    with pytest.raises(ValueError, match="system message"):
        dialog_positions(tokenizer, DIALOG[1:])


def test_system_share_of_uniform_attention_is_system_length_over_position(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.zero_()  # every score 0: each query attends uniformly to keys 0..i
    ids, system, turns = dialog_positions(tokenizer, DIALOG)
    share = system_attention_by_turn(model, tokenizer, DIALOG)
    expected = torch.tensor([sum(len(system) / p for p in positions) / len(positions) for positions in turns])
    assert share.shape == (3, 2)
    torch.testing.assert_close(share, expected.expand(3, 2), atol=1e-6, rtol=1e-5)
    assert share[0, 1] < share[0, 0]  # later turns: the system message is a smaller share of more keys
