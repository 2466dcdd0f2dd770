"""Checkpoint interop: Meta shards, HF folders, our format and Lightning .ckpt, exactly and safely.

Every checkpoint here is built by the test itself: a tiny model's state dict split into Meta's
model-parallel shards along the dimensions of Meta's ``llama/model.py`` (written down again below, on
purpose, rather than imported from the code under test), or saved by transformers itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from llama2_lit.checkpoints import (
    CheckpointError, LazyTensor, config_from_hf, detect_format, export_hf, ffn_size_parameters, hf_config_dict,
    load_checkpoint, load_model, meta_to_hf_state_dict, save_model, write_hf_tokenizer, write_safetensors,
)
from llama2_lit.cli import main as cli_main
from llama2_lit.config import ModelConfig
from llama2_lit.model import Transformer
from llama2_lit.tokenizer import Tokenizer

# Meta's llama/model.py: how its model-parallel ranks split each tensor (None = replicated).
META_SPLIT_DIM = {
    "tok_embeddings.weight": 1, "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None,
    "output.weight": 0,
}


def tiny_config(n_heads: int = 8, n_kv_heads: int = 2, **overrides) -> ModelConfig:
    values = dict(name="tiny", dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=320,
                  multiple_of=32, max_seq_len=128)
    values.update(overrides)
    return ModelConfig(**values)


def split_dim(name: str) -> int | None:
    return META_SPLIT_DIM[name.split(".", 2)[-1] if name.startswith("layers.") else name]


def write_meta_checkpoint(folder: Path, state: dict[str, torch.Tensor], n_shards: int, params: dict) -> Path:
    """As Meta's download: params.json + consolidated.NN.pth, one per model-parallel rank, + rope.freqs."""
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = params["dim"] // params["n_heads"]
    theta = params.get("rope_theta", 10000.0)
    rope_freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for rank in range(n_shards):
        shard = {}
        for name, tensor in state.items():
            dim = split_dim(name)
            shard[name] = tensor.clone() if dim is None else tensor.chunk(n_shards, dim)[rank].clone()
        shard["rope.freqs"] = rope_freqs.clone()
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def meta_params(config: ModelConfig, **extra) -> dict:
    params = {"dim": config.dim, "multiple_of": config.multiple_of, "n_heads": config.n_heads,
              "n_layers": config.n_layers, "norm_eps": config.norm_eps, "vocab_size": -1}
    if config.n_kv_heads != config.n_heads:
        params["n_kv_heads"] = config.n_kv_heads
    params.update(extra)
    return params


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def hf_twin_state(state: dict, config: ModelConfig) -> dict:
    return {name: tensor.contiguous() for name, tensor in meta_to_hf_state_dict(state, config).items()}


def build_hf_model(state: dict, config: ModelConfig) -> transformers.LlamaForCausalLM:
    hf_config = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(config).items()
                                            if k not in ("architectures", "model_type", "dtype")})
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.load_state_dict(hf_twin_state(state, config), strict=True)
    return model


def nothing_left_behind(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".old" in p.name]


# ------------------------------------------------------------------------------------ Meta
@pytest.mark.parametrize("n_shards, n_kv_heads", [(1, 2), (2, 2), (8, 8)])
def test_meta_shards_merge_back_to_the_original_weights(tmp_path, n_shards, n_kv_heads):
    config = tiny_config(n_heads=8, n_kv_heads=n_kv_heads)
    state = Transformer(config).state_dict()
    folder = write_meta_checkpoint(tmp_path / "meta", state, n_shards, meta_params(config))
    assert detect_format(folder) == "meta"
    loaded, loaded_config = load_checkpoint(folder)
    assert_same_state(loaded, state)
    assert (loaded_config.dim, loaded_config.n_kv_heads, loaded_config.vocab_size) == (64, n_kv_heads, 320)
    assert loaded_config.hidden_dim == config.hidden_dim


def test_meta_two_shards_to_ours_to_hf_gives_the_same_logits_in_transformers(tmp_path):
    config = tiny_config(n_heads=8, n_kv_heads=2)
    model = Transformer(config).eval()
    meta = write_meta_checkpoint(tmp_path / "meta", model.state_dict(), 2, meta_params(config))
    state, meta_config = load_checkpoint(meta)
    ours = save_model(state, meta_config, tmp_path / "ours")
    state, ours_config = load_checkpoint(ours)
    hf_dir = export_hf(state, ours_config, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, 320, (2, 37))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-5
        assert (load_model(ours)(tokens) - model(tokens)).abs().max().item() <= 1e-5


def test_meta_params_optional_keys_and_vocab_from_tensors(tmp_path):
    # 70B-style params.json: GQA, ffn_dim_multiplier, a non-default rope_theta (Code Llama's 1e6).
    config = tiny_config(n_heads=8, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=1.3, rope_theta=1e6)
    state = Transformer(config).state_dict()
    params = meta_params(config, ffn_dim_multiplier=1.3, rope_theta=1e6)
    _, loaded = load_checkpoint(write_meta_checkpoint(tmp_path / "meta", state, 2, params))
    assert loaded.ffn_dim_multiplier == 1.3 and loaded.rope_theta == 1e6 and loaded.n_kv_heads == 2
    assert loaded.vocab_size == 320  # params.json says -1
    assert loaded.hidden_dim == 256 == config.hidden_dim  # int(1.3 * 170) = 221 -> 256


def test_meta_rope_freqs_that_contradict_params_json_are_an_error(tmp_path):
    config = tiny_config()
    folder = write_meta_checkpoint(tmp_path / "meta", Transformer(config).state_dict(), 1,
                                   meta_params(config, rope_theta=1e6))
    (folder / "params.json").write_text(json.dumps(meta_params(config)))  # rope_theta dropped: 1e4 assumed
    with pytest.raises(CheckpointError, match="rope.freqs' does not match rope_theta=10000.0"):
        load_checkpoint(folder)


def test_a_shard_with_a_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    config = tiny_config()
    folder = write_meta_checkpoint(tmp_path / "meta", Transformer(config).state_dict(), 2, meta_params(config))
    shard = torch.load(folder / "consolidated.01.pth")
    shard["layers.1.attention.wq.weight"] = torch.zeros(24, 64)
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder)
    message = str(error.value)
    assert "consolidated.01.pth" in message and "'layers.1.attention.wq.weight'" in message
    assert "(24, 64)" in message and "(32, 64)" in message


def test_params_json_that_disagrees_with_the_tensors_is_a_clear_error(tmp_path):
    config = tiny_config()
    state = Transformer(config).state_dict()
    folder = write_meta_checkpoint(tmp_path / "meta", state, 2, meta_params(config, n_heads=4, n_kv_heads=4))
    with pytest.raises(CheckpointError, match=r"params.json disagrees with the tensors: .*'layers.0.attention.wk.weight' "
                                              r"has shape \(16, 64\) but the config .* implies \(64, 64\)"):
        load_checkpoint(folder)
    (folder / "params.json").write_text(json.dumps(meta_params(config, n_layers=3)))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.2.attention.wq.weight'"):
        load_checkpoint(folder)
    (folder / "params.json").write_text(json.dumps(meta_params(config, use_scaled_rope=True)))
    with pytest.raises(CheckpointError, match="unknown key 'use_scaled_rope'"):
        load_checkpoint(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    config = tiny_config()
    state = Transformer(config).state_dict()
    del state["layers.1.ffn_norm.weight"]
    with pytest.raises(CheckpointError, match="missing tensor 'layers.1.ffn_norm.weight'"):
        save_model(state, config, tmp_path / "a")
    state = Transformer(config).state_dict()
    state["layers.0.attention.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.attention.bias'"):
        save_model(state, config, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------ Hugging Face
def test_hf_import_single_and_sharded_safetensors_equal_the_original(tmp_path):
    config = tiny_config(n_heads=8, n_kv_heads=2)
    state = Transformer(config).state_dict()
    hf = build_hf_model(state, config)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for folder in ("single", "sharded"):
        assert detect_format(tmp_path / folder) == "hf"
        loaded, loaded_config = load_checkpoint(tmp_path / folder)
        assert_same_state(loaded, state)
        assert loaded_config.hidden_dim == config.hidden_dim and loaded_config.n_kv_heads == 2


def test_hf_import_pytorch_model_bin_single_and_indexed(tmp_path):
    config = tiny_config(n_heads=4, n_kv_heads=4)
    state = Transformer(config).state_dict()
    hf_state = hf_twin_state(state, config)
    hf_config = hf_config_dict(config)
    single, sharded = tmp_path / "bin", tmp_path / "bin_sharded"
    single.mkdir()
    sharded.mkdir()
    (single / "config.json").write_text(json.dumps(hf_config))
    torch.save(hf_state, single / "pytorch_model.bin")
    (sharded / "config.json").write_text(json.dumps(hf_config))
    names = list(hf_state)
    weight_map = {}
    for k, part in enumerate((names[:7], names[7:]), start=1):
        file_name = f"pytorch_model-{k:05d}-of-00002.bin"
        torch.save({n: hf_state[n] for n in part}, sharded / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder in (single, sharded):
        loaded, _ = load_checkpoint(folder)
        assert_same_state(loaded, state)


def test_hf_config_maps_onto_the_llama2_presets():
    seven_b = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "vocab_size": 32000,
               "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}
    config = config_from_hf(seven_b)
    assert (config.multiple_of, config.ffn_dim_multiplier, config.hidden_dim) == (256, None, 11008)
    seventy_b = dict(seven_b, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8)
    config = config_from_hf(seventy_b)
    assert (config.multiple_of, config.ffn_dim_multiplier, config.hidden_dim) == (4096, 1.3, 28672)
    assert config.num_parameters() == 68_976_648_192
    with pytest.raises(CheckpointError, match="tie_word_embeddings=True is not Llama 2's"):
        config_from_hf(dict(seven_b, tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match="rope type='linear'"):
        config_from_hf(dict(seven_b, rope_scaling={"type": "linear", "factor": 2.0}))


@pytest.mark.parametrize("dim, intermediate_size", [(4096, 11008), (5120, 13824), (8192, 28672), (8192, 22016),
                                                    (64, 100), (64, 192), (512, 1408), (96, 40)])
def test_ffn_size_parameters_reproduce_any_intermediate_size(dim, intermediate_size):
    multiple_of, multiplier = ffn_size_parameters(dim, intermediate_size)
    config = ModelConfig(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    assert config.hidden_dim == intermediate_size


def test_hf_export_is_sharded_with_an_index_when_large(tmp_path):
    config = tiny_config()
    model = Transformer(config).eval()
    out = export_hf(model, config, tmp_path / "hf", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 320, (1, 11))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-5
    assert_same_state(load_checkpoint(out)[0], model.state_dict())


def test_reward_model_exports_as_sequence_classification(tmp_path):
    config = tiny_config()
    model = Transformer(config, lm_head=False, scalar_head=True).eval()
    out = export_hf(model, config, tmp_path / "rm")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(out).eval()
    tokens = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert (hf(tokens).logits[:, 0] - model.score_sequences(tokens)).abs().max().item() <= 1e-5
    assert_same_state(load_checkpoint(out)[0], model.state_dict())


# ------------------------------------------------------------------------------------ ours + Lightning
def test_our_format_round_trip_keeps_dtype_and_tokenizer(tmp_path, meta_tokenizer_path):
    config = tiny_config()
    model = Transformer(config).to(torch.bfloat16)
    out = save_model(model, config, tmp_path / "ours", tokenizer_path=meta_tokenizer_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert detect_format(out) == "lit"
    state, loaded_config = load_checkpoint(out)
    assert loaded_config == config
    assert_same_state(state, model.state_dict())
    assert load_model(out, dtype=torch.bfloat16).layers[0].attention.wq.weight.dtype == torch.bfloat16


def test_load_model_heads(tmp_path):
    config = tiny_config()
    lm = save_model(Transformer(config), config, tmp_path / "lm")
    reward = load_model(lm, lm_head=False, scalar_head=True)  # reward model from the SFT checkpoint (paper 3.2.2)
    assert reward.output is None and reward.score.weight.shape == (1, 64)
    assert all(p.requires_grad for p in reward.parameters())  # trainable, as a fresh model
    assert abs(reward.score.weight.std().item() - 1 / 65 ** 0.5) < 0.05
    assert torch.equal(reward.tok_embeddings.weight, load_checkpoint(lm)[0]["tok_embeddings.weight"])
    scalar_only = save_model(reward, config, tmp_path / "rm")
    with pytest.raises(CheckpointError, match="no LM head"):
        load_model(scalar_only)


def lightning_checkpoint(model: Transformer, prefix: str = "model.") -> dict:
    """What a stage's ModelCheckpoint writes: the core under ``model.`` plus training state."""
    return {
        "epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.6.0",
        "state_dict": {prefix + name: tensor for name, tensor in model.state_dict().items()},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 3e-4}]}],
        "lr_schedulers": [{"last_epoch": 10}], "callbacks": {}, "loops": {},
        "hyper_parameters": {"lr": 3e-4, "betas": (0.9, 0.95)},
        "model_config": model.config.to_dict(), "tokenizer_path": None,
        "rng_states": [{"python": (3, tuple(range(5)), None), "torch": torch.get_rng_state()}],
    }


@pytest.mark.parametrize("prefix", ["model.", "model._orig_mod."])
def test_lightning_ckpt_import(tmp_path, prefix):
    model = Transformer(tiny_config()).eval()
    torch.save(lightning_checkpoint(model, prefix), tmp_path / "last.ckpt")
    assert detect_format(tmp_path / "last.ckpt") == "lightning"
    state, config = load_checkpoint(tmp_path / "last.ckpt")
    assert config == model.config
    assert_same_state(state, model.state_dict())
    tokens = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "last.ckpt")(tokens), model(tokens))


def test_lightning_ckpt_without_model_config_is_a_clear_error(tmp_path):
    checkpoint = lightning_checkpoint(Transformer(tiny_config()))
    del checkpoint["model_config"]
    torch.save(checkpoint, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="no 'model_config'"):
        load_checkpoint(tmp_path / "x.ckpt")


class _RunsCode:
    """A pickle payload: unpickling it would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    checkpoint = lightning_checkpoint(Transformer(tiny_config()))
    marker = tmp_path / "pwned"
    checkpoint["hyper_parameters"] = {"payload": _RunsCode(marker)}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refusing to unpickle.*GLOBAL posix.mkdir"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ bad input
def test_corrupt_and_unknown_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")
    config = tiny_config()
    ours = save_model(Transformer(config), config, tmp_path / "ours")
    (ours / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(ours)
    meta = write_meta_checkpoint(tmp_path / "meta", Transformer(config).state_dict(), 1, meta_params(config))
    (meta / "consolidated.00.pth").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="consolidated.00.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(meta)
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="sharded .*llama2-lit consolidate"):
        load_checkpoint(tmp_path / "dcp")


def test_hf_tensor_with_a_wrong_shape_or_name(tmp_path):
    config = tiny_config()
    hf = build_hf_model(Transformer(config).state_dict(), config)
    hf.save_pretrained(tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(hf_config, num_key_value_heads=4)))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\) "
                                              r"but the config .* implies \(32, 64\)"):
        load_checkpoint(tmp_path / "hf")


# ------------------------------------------------------------------------------------ writer
def test_streaming_safetensors_writer_is_read_back_exactly(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.randn(2, 2, 2)}
    lazy = {**tensors, "d": LazyTensor((4,), torch.float16, lambda: torch.ones(4, dtype=torch.float16))}
    write_safetensors(tmp_path / "x.safetensors", lazy)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as file:
        assert list(file.keys()) == ["a", "b", "c", "d"]
        for name, tensor in tensors.items():
            assert torch.equal(file.get_tensor(name), tensor)
        assert torch.equal(file.get_tensor("d"), torch.ones(4, dtype=torch.float16))


# ------------------------------------------------------------------------------------ tokenizer
TEXTS = ["Hello this is a test", "2023 🦙\nnew line", "a  b   c    d", "  two leading spaces", " ", "", "x\n\n  y",
         "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 7 * 6? [/INST]", "héllo wörld\t!", "日本語のテキスト"]


def test_exported_tokenizer_loads_in_transformers_and_encodes_like_ours(tmp_path, meta_tokenizer_path):
    config = tiny_config(vocab_size=32000)
    out = export_hf(Transformer(config), config, tmp_path / "hf", tokenizer_path=meta_tokenizer_path)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(meta_tokenizer_path)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (1, 2, None)
    for text in TEXTS:
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == ours.encode(text, bos=True, eos=False), text
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == ours.decode(ids[1:])
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, 2)


# ------------------------------------------------------------------------------------ CLI
def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    return exit_.value.code


def test_cli_convert_meta_to_ours_to_hf(tmp_path, capsys):
    config = tiny_config()
    model = Transformer(config).eval()
    meta = write_meta_checkpoint(tmp_path / "meta", model.state_dict(), 2, meta_params(config))
    assert run_cli(["convert", str(meta), str(tmp_path / "ours")]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("converted meta") and "2 shards" in summary[0]
    assert run_cli(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf",
                    "--dtype", "bfloat16"]) == 0
    state, _ = load_checkpoint(tmp_path / "hf")
    assert state["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    assert torch.equal(state["layers.0.attention.wq.weight"],
                       model.state_dict()["layers.0.attention.wq.weight"].to(torch.bfloat16))


def test_cli_failure_writes_nothing_and_existing_output_needs_overwrite(tmp_path, capsys):
    config = tiny_config()
    meta = write_meta_checkpoint(tmp_path / "meta", Transformer(config).state_dict(), 2, meta_params(config, n_layers=3))
    assert run_cli(["convert", str(meta), str(tmp_path / "out")]) == 2
    assert "missing tensor 'layers.2." in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and nothing_left_behind(tmp_path) == []

    (meta / "params.json").write_text(json.dumps(meta_params(config)))
    assert run_cli(["convert", str(meta), str(tmp_path / "out")]) == 0
    assert run_cli(["convert", str(meta), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli(["convert", str(meta), str(tmp_path / "out"), "--to", "hf", "--overwrite"]) == 0
    assert detect_format(tmp_path / "out") == "hf" and nothing_left_behind(tmp_path) == []


def test_a_failure_while_writing_leaves_no_partial_folder(tmp_path):
    config = tiny_config()
    state = dict(Transformer(config).state_dict())

    def broken() -> torch.Tensor:
        raise RuntimeError("disk on fire")

    state["norm.weight"] = LazyTensor((64,), torch.float32, broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_model(state, config, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_exported_tokenizer_of_a_tokenizer_we_trained_encodes_like_ours(tmp_path):
    from llama2_lit.tokenizer import train_tokenizer

    words = ["the", "cat", "sat", "on", "a", "mat", "Paris", "is", "in", "France", "2023", "héllo", "  "]
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 5)) for i in range(300)]
    model_path = train_tokenizer(None, tmp_path / "toy.model", 300, texts=texts)
    write_hf_tokenizer(model_path, tmp_path / "hf", model_max_length=128)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer(model_path)
    for text in texts[:50] + TEXTS:
        assert hf_tokenizer(text)["input_ids"] == ours.encode(text, bos=True, eos=False), text
