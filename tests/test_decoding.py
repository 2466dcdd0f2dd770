"""The fused decoder (``llama2_lit.decoding.FusedDecoder``) computes the model's prefill and decoding steps.

Greedy decoding through it gives the tokens of the model's own single-token path, of full forward
passes without a cache (``test_generation.py``) and of Hugging Face's ``generate`` on the same
weights, token for token.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from llama2_lit.checkpoints import meta_to_hf_state_dict
from llama2_lit.config import ModelConfig
from llama2_lit.decoding import PACKED_ROWS, FusedDecoder, fused_decoder, onednn_linear_available
from llama2_lit.generation import generate
from llama2_lit.model import KVCache, Transformer

PROMPTS = [[1, 17, 42, 99, 5, 7, 250], [1, 8], [1, 300, 301, 4, 4]]  # ragged: left padding


def tiny_model(n_kv_heads: int = 2, **overrides) -> Transformer:
    # A wider init than pretraining's 0.02 spreads the logits as a trained model's are, so greedy
    # choices are never near-ties that the last bit of a sum could flip.
    values = dict(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=320,
                  multiple_of=32, max_seq_len=64, init_std=0.08)
    values.update(overrides)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**values)).eval()


def model_path_logits(model: Transformer, tokens: torch.Tensor, cache: KVCache, mask=None) -> torch.Tensor:
    return model(tokens if tokens.dim() == 2 else tokens[:, None], attention_mask=mask, cache=cache)[:, -1]


def caches(model: Transformer, batch: int, length: int) -> tuple[KVCache, KVCache]:
    dtype = next(model.parameters()).dtype
    return KVCache(model.config, batch, length, dtype=dtype), KVCache(model.config, batch, length, dtype=dtype)


@pytest.mark.parametrize("prepack", [None, False], ids=["default", "F.linear"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_prefill_and_steps_equal_the_models_own_path(n_kv_heads, padded, prepack):
    model = tiny_model(n_kv_heads)
    prompts = torch.randint(3, 320, (3, 9))
    mask = None
    if padded:
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, :6] = 0
        mask[2, :2] = 0
    decoder = FusedDecoder(model, prepack=prepack)  # False: the path of devices without oneDNN (GPUs)
    with torch.inference_mode():
        ours_cache, model_cache = caches(model, 3, 24)
        ours, reference = decoder.prefill(prompts, ours_cache, mask), model_path_logits(model, prompts, model_cache, mask)
        assert (ours - reference).abs().max().item() <= 1e-5
        assert ours_cache.has_padding == model_cache.has_padding == padded
        assert torch.equal(ours_cache.key_mask, model_cache.key_mask) and torch.equal(ours_cache.n_real, model_cache.n_real)
        tokens = reference.argmax(-1)
        for i in range(12):
            ours, reference = decoder.step(tokens, ours_cache), model_path_logits(model, tokens, model_cache)
            assert ours.dtype == torch.float32 and ours.shape == (len(tokens), 320)
            assert (ours - reference).abs().max().item() <= 1e-5, f"step {i}"
            assert ours_cache.length == model_cache.length and torch.equal(ours_cache.n_real, model_cache.n_real)
            tokens = reference.argmax(-1)
            if i == 5:  # rows dropped from the batch, as generate(drop_finished=True) does
                keep = torch.tensor([0, 2])
                ours_cache.keep_rows(keep)
                model_cache.keep_rows(keep)
                tokens = tokens[keep]
        # Every real slot holds the model's keys and values (padding slots are masked, never read).
        real = ours_cache.key_mask[:, :ours_cache.length]
        assert torch.equal(real, model_cache.key_mask[:, :model_cache.length])
        for cached, reference in ((ours_cache.keys, model_cache.keys), (ours_cache.values, model_cache.values)):
            difference = (cached - reference)[:, :, :, :ours_cache.length].abs().amax(dim=(2, 4))  # (layers, batch, slots)
            assert difference[:, real].max().item() <= 1e-5


@pytest.mark.parametrize("prepack", [None, False], ids=["default", "F.linear"])
def test_the_decoder_in_bf16_stays_within_bf16_rounding_of_the_models_path(prepack):
    model = tiny_model().to(torch.bfloat16)
    prompts = torch.randint(3, 320, (2, 8))
    decoder = FusedDecoder(model, prepack=prepack)
    with torch.inference_mode():
        ours_cache, model_cache = caches(model, 2, 16)
        ours, reference = decoder.prefill(prompts, ours_cache), model_path_logits(model, prompts, model_cache)
        for _ in range(4):
            assert ours_cache.keys.dtype == torch.bfloat16 and ours.dtype == torch.float32
            assert (ours - reference).abs().max().item() <= 0.05 * reference.abs().max().item()
            tokens = reference.argmax(-1)
            ours, reference = decoder.step(tokens, ours_cache), model_path_logits(model, tokens, model_cache)


def test_the_decoder_leaves_the_model_alone_and_refuses_what_it_does_not_compute():
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    FusedDecoder(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert FusedDecoder.supports(model)
    assert not FusedDecoder.supports(Transformer(model.config, lm_head=False, scalar_head=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the model's own path defines autocast's casts
        assert not FusedDecoder.supports(model)
    cache = KVCache(model.config, 1, 4)
    with pytest.raises(ValueError, match="exceeds the cache length of 4"):
        FusedDecoder(model).prefill(torch.ones(1, 5, dtype=torch.long), cache)
    FusedDecoder(model).prefill(torch.ones(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceeds the cache length of 4"):
        FusedDecoder(model).step(torch.tensor([1]), cache)
    with pytest.raises(ValueError, match="empty cache"):
        FusedDecoder(model).prefill(torch.ones(1, 1, dtype=torch.long), cache)


def test_the_cpu_uses_prepacked_onednn_weights_where_torch_has_onednn():
    assert FusedDecoder(tiny_model()).packed_rows == (PACKED_ROWS if onednn_linear_available(torch.device("cpu")) else None)


def test_the_kept_decoder_is_rebuilt_after_any_change_to_the_parameters():
    model = tiny_model()
    first = fused_decoder(model)
    assert fused_decoder(model) is first
    greedy = dict(max_new_tokens=6, temperature=0.0, eos_id=None)
    before = generate(model, PROMPTS, **greedy).response_ids

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # a training step changes the weights
    model(torch.tensor([PROMPTS[0]])).sum().backward()
    optimizer.step()
    after_step = fused_decoder(model)
    assert after_step is not first
    stepped = generate(model, PROMPTS, **greedy).response_ids
    model.zero_grad()

    fresh = tiny_model()  # load_state_dict copies in place
    model.load_state_dict(fresh.state_dict())
    assert fused_decoder(model) is not after_step
    assert torch.equal(generate(model, PROMPTS, **greedy).response_ids, generate(fresh, PROMPTS, **greedy).response_ids)
    assert not torch.equal(stepped, before)  # the step changed what the model says, and generate saw it

    model.to(torch.bfloat16)  # new tensors in place of the parameters
    assert fused_decoder(model).embeddings.dtype == torch.bfloat16


def hf_twin(model: Transformer) -> transformers.LlamaForCausalLM:
    cfg = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )).eval()
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), cfg), strict=True)
    return hf


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_greedy_generation_equals_hugging_face_generate_token_for_token(n_kv_heads):
    model = tiny_model(n_kv_heads)
    hf = hf_twin(model)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    ours = generate(model, PROMPTS, max_new_tokens=20, temperature=0.0, eos_id=None)
    with torch.inference_mode():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                             pad_token_id=0, use_cache=True)
    assert ours.response_ids.tolist() == theirs[:, width:].tolist()
    assert len({tuple(row) for row in ours.response_ids.tolist()}) == 3  # not one degenerate answer
