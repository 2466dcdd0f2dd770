"""The model core is exactly Llama 2: parity with HF transformers, padding, KV cache, heads."""

from __future__ import annotations

import pytest
import torch
import transformers

from llama2_lit.checkpoints import hf_to_meta_state_dict, meta_to_hf_state_dict
from llama2_lit.config import PRESETS, ModelConfig
from llama2_lit.model import KVCache, Transformer, apply_rotary_emb, last_token_index, precompute_freqs_cis


def tiny_config(n_kv_heads: int, **overrides) -> ModelConfig:
    values = dict(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=320,
                  multiple_of=32, max_seq_len=128)
    values.update(overrides)
    return ModelConfig(**values)


def hf_twin(model: Transformer) -> transformers.LlamaForCausalLM:
    """An HF LlamaForCausalLM holding the same weights."""
    cfg = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), cfg), strict=True)
    return hf


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name, hidden, params", [
    ("llama2-7b", 11008, 6_738_415_616),
    ("llama2-13b", 13824, 13_015_864_320),
    ("llama2-70b", 28672, 68_976_648_192),
    ("llama2-34b", 22016, 33_743_970_304),
])
def test_llama2_presets_have_exact_shapes_and_parameter_counts(name, hidden, params):
    config = ModelConfig.from_name(name)
    assert config.hidden_dim == hidden
    assert config.num_parameters() == params
    assert config.norm_eps == 1e-5 and config.vocab_size == 32000 and config.head_dim == 128


def test_34b_is_marked_unconfirmed_and_the_released_sizes_are_not():
    assert PRESETS["llama2-34b"].unconfirmed
    assert not any(PRESETS[n].unconfirmed for n in ("llama2-7b", "llama2-13b", "llama2-70b"))


def test_course_sizes_are_in_their_ranges_and_counts_match_the_module():
    assert ModelConfig.from_name("nano").num_parameters() < 1_000_000
    assert 5_000_000 <= ModelConfig.from_name("micro").num_parameters() <= 10_000_000
    assert 25_000_000 <= ModelConfig.from_name("mini").num_parameters() <= 50_000_000
    for name in ("nano", "micro"):
        model = Transformer(ModelConfig.from_name(name))
        assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()


def test_flops_per_token_is_6n_plus_attention():
    config = ModelConfig.from_name("llama2-7b")
    n = config.num_parameters(embeddings=False)
    assert config.flops_per_token(4096) == 6 * n + 12 * 32 * 4096 * 4096
    assert config.flops_per_token(4096, training=False) * 3 == config.flops_per_token(4096)


def test_invalid_config_names_the_problem():
    with pytest.raises(ValueError, match="not divisible by n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(KeyError, match="unknown model preset"):
        ModelConfig.from_name("llama2-8b")


def test_config_json_round_trip(tmp_path):
    config = ModelConfig.from_name("micro")
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_logits_equal_hf_llama(n_kv_heads):
    model = Transformer(tiny_config(n_kv_heads)).eval()
    hf = hf_twin(model)
    tokens = torch.randint(0, 320, (3, 40))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_left_padded_logits_equal_hf_and_unpadded_rows():
    model = Transformer(tiny_config(2)).eval()
    hf = hf_twin(model)
    tokens = torch.randint(0, 320, (3, 30))
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :17] = 0
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        theirs = hf(tokens, attention_mask=mask).logits
        alone = model(tokens[2:, 17:])
    real = mask.bool()
    assert (ours - theirs)[real].abs().max().item() <= 1e-5
    assert (ours[2, 17:] - alone[0]).abs().max().item() <= 1e-5
    assert torch.isfinite(ours).all()  # padding queries do not produce NaNs


def test_right_padded_rows_equal_unpadded_rows_with_or_without_mask():
    model = Transformer(tiny_config(2)).eval()
    tokens = torch.randint(0, 320, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 10:] = 0
    with torch.no_grad():
        masked = model(tokens, attention_mask=mask)
        unmasked = model(tokens)
        alone = model(tokens[1:, :10])
    assert (masked[1, :10] - alone[0]).abs().max().item() <= 1e-5
    assert (unmasked[1, :10] - alone[0]).abs().max().item() <= 1e-5


def test_block_diagonal_mask_isolates_packed_documents():
    model = Transformer(tiny_config(2)).eval()
    first, second = torch.randint(0, 320, (1, 7)), torch.randint(0, 320, (1, 9))
    packed = torch.cat([first, second], dim=1)
    doc = torch.tensor([[0] * 7 + [1] * 9])
    block = (doc[:, :, None] == doc[:, None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        logits = model(packed, attention_mask=block, position_ids=positions)
        assert (logits[:, 7:] - model(second)).abs().max().item() <= 1e-5
        assert (logits[:, :7] - model(first)).abs().max().item() <= 1e-5


def test_hf_state_dict_round_trip_is_exact():
    config = tiny_config(2)
    state = Transformer(config).state_dict()
    back = hf_to_meta_state_dict(meta_to_hf_state_dict(state, config), config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_rope_matches_meta_reference_complex_formula():
    """Meta: view pairs (2i, 2i+1) as complex numbers and multiply by polar(1, t * theta^(-2i/d))."""
    freqs = precompute_freqs_cis(8, 16)
    x = torch.randn(1, 16, 2, 8)
    out = apply_rotary_emb(x, freqs[None, :, None, :])
    t, i = 5, 3
    angle = t * 10000.0 ** (-(2 * i) / 8)
    a, b = x[0, t, 1, 2 * i], x[0, t, 1, 2 * i + 1]
    expected = torch.tensor([a * torch.cos(torch.tensor(angle)) - b * torch.sin(torch.tensor(angle)),
                             a * torch.sin(torch.tensor(angle)) + b * torch.cos(torch.tensor(angle))])
    assert torch.allclose(out[0, t, 1, 2 * i:2 * i + 2], expected, atol=1e-6)


def test_rope_under_torch_compile_takes_the_real_arithmetic_branch_and_equals_eager():
    """Under torch.compile, apply_rotary_emb computes the complex product in real arithmetic (Inductor
    generates no code for complex ops). The graph Dynamo captures (read by a recording backend, no
    code generation: fast) must hold that branch, and give what the eager complex product gives."""
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    freqs = precompute_freqs_cis(16, 32)[:7][None, :, None, :]
    x = torch.randn(2, 7, 3, 16, dtype=torch.bfloat16)
    compiled = torch.compile(apply_rotary_emb, backend=recording_backend, fullgraph=True)(x, freqs)
    eager = apply_rotary_emb(x, freqs)
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes}
    assert len(graphs) == 1 and not any("view_as_complex" in t for t in targets), targets
    assert any("stack" in t for t in targets), targets
    assert compiled.dtype == torch.bfloat16 and eager.dtype == torch.bfloat16
    assert torch.allclose(compiled.float(), eager.float(), atol=1e-2, rtol=0)
    assert (compiled.float() - eager.float()).abs().mean() < 1e-3  # the same fp32 math, then one bf16 rounding


def test_rope_tables_survive_a_bf16_cast():
    model = Transformer(tiny_config(2)).eval()
    tokens = torch.randint(0, 320, (1, 12))
    reference = model(tokens)
    model.to(torch.bfloat16)
    assert model.freqs_cis(torch.device("cpu")).dtype == torch.complex64
    assert (model(tokens) - reference).abs().max().item() < 0.1


# ------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_incremental_decoding_with_cache_equals_full_forward(n_kv_heads):
    model = Transformer(tiny_config(n_kv_heads)).eval()
    tokens = torch.randint(0, 320, (2, 33))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, batch_size=2, max_seq_len=64)
        pieces = [model(tokens[:, :20], cache=cache)]
        pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(20, 33)]
    assert cache.length == 33
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_cache_with_left_padding_equals_each_row_alone():
    model = Transformer(tiny_config(2)).eval()
    tokens = torch.randint(0, 320, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=2, max_seq_len=32)
        prefill = model(tokens[:, :15], attention_mask=mask[:, :15], cache=cache)
        steps = [model(tokens[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache) for t in range(15, 20)]
        incremental = torch.cat([prefill] + steps, dim=1)
        alone = model(tokens[:1, 6:])
    assert (incremental[0, 6:] - alone[0]).abs().max().item() <= 1e-5


def test_context_overflow_is_a_clear_error():
    model = Transformer(tiny_config(2, max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="exceeds the context length of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------ heads
def test_scalar_head_reads_last_real_token_for_left_and_right_padding():
    model = Transformer(tiny_config(2), lm_head=False, scalar_head=True).eval()
    seq = torch.randint(0, 320, (1, 9))
    right = torch.cat([seq, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    left = torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], dim=1)
    mask_right = torch.tensor([[1] * 9 + [0] * 4])
    mask_left = torch.tensor([[0] * 4 + [1] * 9])
    with torch.no_grad():
        alone = model.score_sequences(seq)
        assert (model.score_sequences(right, mask_right) - alone).abs().item() <= 1e-5
        assert (model.score_sequences(left, mask_left) - alone).abs().item() <= 1e-5
        values = model.scalar_outputs(seq)
    assert values.shape == (1, 9)
    assert (values[0, -1] - alone[0]).abs().item() <= 1e-5


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_head_selection_errors():
    with pytest.raises(ValueError, match="at least one head"):
        Transformer(tiny_config(2), lm_head=False)
    with pytest.raises(RuntimeError, match="no LM head"):
        Transformer(tiny_config(2), lm_head=False, scalar_head=True)(torch.zeros(1, 3, dtype=torch.long))


def test_initialisation_scales():
    model = Transformer(ModelConfig.from_name("micro"))
    std = model.config.init_std
    assert abs(model.layers[0].attention.wq.weight.std().item() - std) < 0.002
    residual = std / (2 * model.config.n_layers) ** 0.5
    assert abs(model.layers[0].feed_forward.w2.weight.std().item() - residual) < 0.001
    assert torch.all(model.norm.weight == 1)


def test_meta_device_model_can_be_materialised():
    """Built on the meta device, then to_empty + reset_parameters: exactly the model a CPU build
    initialises with the same seed (the path every sharded stage takes)."""
    with torch.device("meta"):
        model = Transformer(tiny_config(2))
    model.to_empty(device="cpu")
    torch.manual_seed(7)
    model.reset_parameters()
    reference = Transformer(tiny_config(2))
    torch.manual_seed(7)
    reference.reset_parameters()
    state = model.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(state[name], tensor), name
    tokens = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))
