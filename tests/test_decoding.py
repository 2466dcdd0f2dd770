"""The fused decoder (``llama2_lit.decoding.FusedDecoder``) computes the model's prefill and decoding steps.

Greedy decoding through it gives the tokens of the model's own single-token path, of full forward
passes without a cache (``test_generation.py``) and of Hugging Face's ``generate`` on the same
weights, token for token. Under CPU bf16 autocast (Lightning's ``bf16-mixed``, where PPO, Ghost
Attention and context distillation generate) it computes the model's autocast path: bf16 block
matmuls on bf16 copies of the weights, rounded where the model's path rounds.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from llama2_lit.checkpoints import meta_to_hf_state_dict
from llama2_lit.config import ModelConfig
from llama2_lit.decoding import PACKED_ROWS, FusedDecoder, ambient_matmul_dtype, fused_decoder, onednn_linear_available
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


def ragged_prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Three 9-token prompts; ``padded``: rows 1 and 2 left-padded by 6 and 2 (else no mask)."""
    prompts = torch.randint(3, 320, (3, 9))
    if not padded:
        return prompts, None
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :6] = 0
    mask[2, :2] = 0
    return prompts, mask


@pytest.mark.parametrize("prepack", [None, False], ids=["default", "F.linear"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_prefill_and_steps_equal_the_models_own_path(n_kv_heads, padded, prepack):
    model = tiny_model(n_kv_heads)
    prompts, mask = ragged_prompts(padded)
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


def with_trained_norms(model: Transformer) -> Transformer:
    """Norm weights away from their init of 1, as a trained model's are (they are not folded into
    the bf16 matrices, so this checks where they are applied)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("prepack", [None, False], ids=["default", "F.linear"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_under_bf16_autocast_prefill_and_steps_equal_the_models_autocast_path(n_kv_heads, padded, prepack):
    model = with_trained_norms(tiny_model(n_kv_heads))
    prompts, mask = ragged_prompts(padded)
    with torch.inference_mode(), bf16_autocast():
        decoder = FusedDecoder(model, prepack=prepack, matmul_dtype=ambient_matmul_dtype(model.output.weight))
        assert decoder.layers[0][0].dtype == torch.bfloat16 and decoder.output.dtype == torch.float32  # head in fp32
        ours_cache, model_cache = caches(model, 3, 24)
        ours = decoder.prefill(prompts, ours_cache, mask)
        reference = model_path_logits(model, prompts, model_cache, mask)
        row_differences, scale = [(ours - reference).abs().amax(-1)], reference.abs().max().item()
        tokens = reference.argmax(-1)
        for _ in range(12):
            ours, reference = decoder.step(tokens, ours_cache), model_path_logits(model, tokens, model_cache)
            assert ours.dtype == torch.float32 and ours_cache.keys.dtype == torch.float32
            row_differences.append((ours - reference).abs().amax(-1))
            tokens = reference.argmax(-1)
        with torch.autocast("cpu", enabled=False):  # the model's fp32 path, for scale
            fp32_logits = FusedDecoder(model).prefill(prompts, caches(model, 3, 24)[0], mask)
        autocast_logits = decoder.prefill(prompts, caches(model, 3, 24)[0], mask)
    row_differences = torch.cat(row_differences)
    # The bf16 roundings are the model's autocast path's, so most rows agree to fp32 reordering
    # (<= 7e-7 measured). An fp32 difference (another order of a sum) that lands on a bf16
    # rounding's midpoint flips one bf16 digit, and the cache keeps that row different: measured
    # over the 8 cases, 6 have no such row, 2 have one of 3 rows (from its prefill on), with at
    # most 0.0025 * max |logit|; the fp32 logits differ from the autocast ones by 0.006-0.008 of it.
    assert (row_differences <= 1e-5).float().mean().item() >= 0.6
    assert row_differences.max().item() <= 0.004 * scale
    # ... so the arithmetic is bf16's, with the model's roundings.
    assert (fp32_logits - autocast_logits).abs().max().item() >= 0.004 * scale


def test_greedy_generation_under_bf16_autocast_gives_the_tokens_of_the_models_autocast_path():
    torch.manual_seed(0)
    model = with_trained_norms(Transformer(ModelConfig.from_name("nano")).eval())
    generator = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, model.config.vocab_size, (int(n),), generator=generator).tolist()
               for n in torch.randint(4, 30, (8,), generator=generator)]
    greedy = dict(max_new_tokens=48, temperature=0.0, eos_id=None)
    with bf16_autocast():
        assert FusedDecoder.supports(model)
        fused = generate(model, prompts, **greedy)
        modules = generate(model, prompts, **greedy, fused=False)
    fp32 = generate(model, prompts, **greedy)
    # Measured: all 8 x 48 tokens equal (here, and on the micro preset with the same prompts);
    # the log-probs equal to 1e-5 for 96% of the tokens, within 7e-5 (a flipped bf16 digit, see
    # above) for the rest; micro: 40% and 2.2e-3.
    assert fused.response_ids.tolist() == modules.response_ids.tolist()
    assert (fused.logprobs - modules.logprobs).abs().max().item() <= 1e-3
    # Not the fp32 numbers: bf16's roundings move the log-probs by far more (0.25 measured).
    assert (fused.logprobs - fp32.logprobs).abs().max().item() > 1e-2
    assert len({tuple(row) for row in fused.response_ids.tolist()}) == 8


def test_a_fused_decoder_is_kept_per_matmul_dtype_and_rebuilt_when_the_weights_change():
    model = tiny_model()
    fp32 = fused_decoder(model)
    with bf16_autocast():
        mixed = fused_decoder(model)
        assert fused_decoder(model) is mixed
    assert mixed is not fp32 and mixed.matmul_dtype == torch.bfloat16 and fp32.matmul_dtype == torch.float32
    assert fused_decoder(model) is fp32  # an fp32 call after a bf16 one: its own decoder, not the bf16 one
    with torch.no_grad():
        model.output.weight.mul_(2.0)
    with bf16_autocast():
        assert fused_decoder(model) is not mixed
    assert fused_decoder(model) is not fp32


def test_the_decoder_leaves_the_model_alone_and_refuses_what_it_does_not_compute():
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    FusedDecoder(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert FusedDecoder.supports(model)
    assert not FusedDecoder.supports(Transformer(model.config, lm_head=False, scalar_head=True))
    with bf16_autocast():  # computed: bf16 block matmuls, as the model's autocast path
        assert FusedDecoder.supports(model) and FusedDecoder.supports(model.to(torch.bfloat16))
    model.float()
    with torch.autocast("cpu", dtype=torch.float16):  # not computed: the model's own path
        assert not FusedDecoder.supports(model)
    with pytest.raises(ValueError, match="only bf16 on fp32"):
        FusedDecoder(model, matmul_dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ValueError, match="does not compute"):
        generate(model, PROMPTS, max_new_tokens=2, temperature=0.0, eos_id=None, fused=True)
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

    # A training step changes the weights. A fused optimizer writes them without bumping their
    # version counters (the stages' AdamW is fused): the step itself must be seen.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.tensor([PROMPTS[0]])).sum().backward()
    versions = [p._version for p in model.parameters()]
    optimizer.step()
    assert [p._version for p in model.parameters()] == versions  # why the versions are not enough
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


def test_fsdp_sharded_models_keep_the_models_own_path_with_or_without_autocast():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llama2_lit.parallelize import apply_fsdp

    # One process is a world of one: FSDP2 still makes the parameters DTensors, and the forward
    # still runs FSDP's hooks, which the fused decoder would bypass.
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = tiny_model()
        apply_fsdp(model, init_device_mesh("cpu", (1,)))
        assert hasattr(next(model.parameters()), "to_local")
        assert not FusedDecoder.supports(model)
        with bf16_autocast():
            assert not FusedDecoder.supports(model)
    finally:
        dist.destroy_process_group()
