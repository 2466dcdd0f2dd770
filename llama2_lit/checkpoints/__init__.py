"""Checkpoint interop: Meta's layout, Hugging Face's layout, our own, and Lightning's.

The same Llama 2 weights travel in three folder layouts (plus the ``.ckpt`` files our stages write):

* **Meta** (the ``facebookresearch/llama`` download): ``params.json`` + ``consolidated.NN.pth``,
  one file per model-parallel rank. Tensor names are ours (``model.py`` uses Meta's names). Each
  matrix is split along the dimension its parallel layer splits (``llama/model.py``): column-parallel
  layers (``wq``/``wk``/``wv``, ``w1``/``w3``, ``output``) along dim 0, row-parallel layers
  (``wo``, ``w2``) and the embedding along dim 1; norms are replicated. ``params.json`` stores
  ``vocab_size: -1`` (filled from the tensors here) and omits ``n_kv_heads``/``rope_theta`` when
  they take their defaults. The files also carry ``rope.freqs``, a derived RoPE table we check
  and drop.
* **Hugging Face** (``LlamaForCausalLM.save_pretrained``): ``config.json`` + ``model.safetensors``,
  or shards listed by ``model.safetensors.index.json``, or older ``pytorch_model*.bin``. Names
  differ, and HF rotates half-split pairs instead of Meta's interleaved pairs, so it stores
  ``wq``/``wk`` with their rows permuted within each head (as transformers' ``convert_llama_weights_to_hf.py``).
* **Ours**: ``config.json`` (a ``ModelConfig``) + ``model.safetensors`` in Meta's names, and the
  ``tokenizer.model`` it was trained with.
* **Lightning** ``.ckpt`` written by a stage: ``state_dict`` with the core under ``model.``, the
  ``ModelConfig`` under ``checkpoint["model_config"]`` (see ``llama2_lit.stages.base``).

Safety: nothing is unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``
or safetensors), so a checkpoint from the internet cannot run code.

Memory: every file is memory-mapped; tensors that must be computed (merged Meta shards, HF
permutations, dtype casts) are ``LazyTensor`` recipes, materialised one at a time by the
streaming safetensors writer. Converting a 7B checkpoint therefore needs about one tensor of RAM
beyond the page cache.

One module per format: ``meta``, ``hf`` (+ ``hf_tokenizer``), ``lit`` (ours), ``lightning``; what
they share (validation, safe readers, the streaming writer) is in ``common``. This module detects
the format and loads any of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from llama2_lit.checkpoints.common import (
    CheckpointError, Format, LazyTensor, TensorLike, _cast, _Loaded, _materialize, _read_json, _shape,
    _torch_load, check_state_dict, expected_shapes, write_safetensors,
)
from llama2_lit.checkpoints.hf import (
    _read_hf, config_from_hf, export_hf, ffn_size_parameters, hf_config_dict, hf_to_meta_state_dict,
    meta_to_hf_state_dict, permute_from_hf, permute_to_hf,
)
from llama2_lit.checkpoints.hf_tokenizer import write_hf_tokenizer
from llama2_lit.checkpoints.lightning import _read_lightning
from llama2_lit.checkpoints.lit import _read_lit, save_model
from llama2_lit.checkpoints.meta import _META_SHARD_FILE, _read_meta, meta_shard_dim
from llama2_lit.config import ModelConfig
from llama2_lit.model import Transformer

__all__ = [
    "CheckpointError", "Format", "LazyTensor", "TensorLike", "check_state_dict", "config_from_hf", "convert",
    "detect_format", "expected_shapes", "export_hf", "ffn_size_parameters", "find_tokenizer", "hf_config_dict",
    "hf_to_meta_state_dict", "load_checkpoint", "load_model", "meta_shard_dim", "meta_to_hf_state_dict",
    "permute_from_hf", "permute_to_hf", "save_model", "write_hf_tokenizer", "write_safetensors",
]


# ============================================================================ detection + loading
def detect_format(path: str | Path) -> Format:
    """Which layout ``path`` holds: ``lit``, ``meta``, ``hf`` (folders) or ``lightning`` (a ``.ckpt`` file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth") and not _META_SHARD_FILE.match(path.name):
            return "lightning"
        raise CheckpointError(f"{path}: a single file must be a Lightning .ckpt; for Meta, HF or our format "
                              "pass the folder")
    names = {p.name for p in path.iterdir()}
    if (path / ".metadata").is_file() or path.suffix == ".ckpt":
        raise CheckpointError(
            f"{path}: a sharded (torch.distributed.checkpoint) directory. Its .metadata is a pickle, which this "
            "loader does not unpickle; if you trust it (your own run), consolidate it into one file first: "
            f"llama2-lit consolidate {path} {path.with_suffix('')}-consolidated.ckpt")
    if "params.json" in names and any(_META_SHARD_FILE.match(n) for n in names):
        return "meta"
    if "config.json" in names:
        config = _read_json(path / "config.json")
        if "dim" in config and "n_layers" in config:
            return "lit"
        if "model_type" in config or "hidden_size" in config:
            return "hf"
        raise CheckpointError(f"{path / 'config.json'}: neither our ModelConfig (dim, n_layers, ...) nor a Hugging "
                              "Face config (model_type, hidden_size, ...)")
    raise CheckpointError(f"{path}: not a checkpoint folder. Expected params.json + consolidated.NN.pth (Meta), "
                          f"config.json + weights (Hugging Face or ours); found {sorted(names)[:8]}")


_READERS: dict[str, Callable[[Path], _Loaded]] = {
    "lit": _read_lit, "meta": _read_meta, "hf": _read_hf, "lightning": _read_lightning,
}


def _load(path: str | Path, *, model: str = "model") -> _Loaded:
    """Read any layout; every reader validates names and shapes against the config it found.

    ``model`` picks one model of a multi-model stage ``.ckpt``; other layouts hold one model.
    """
    path = Path(path)
    layout = detect_format(path)
    if layout == "lightning":
        return _read_lightning(path, model)
    if model != "model":
        raise CheckpointError(f"{path}: a {layout} checkpoint holds one model; model={model!r} names a model of "
                              "a multi-model stage .ckpt")
    return _READERS[layout](path)


def find_tokenizer(path: str | Path) -> Path:
    """The tokenizer a checkpoint was trained with: ``tokenizer.model`` in its folder (Meta, HF,
    ours), or the ``tokenizer_path`` a stage's ``.ckpt`` records; a ``CheckpointError`` saying what
    to do when there is none."""
    path = Path(path)
    if detect_format(path) != "lightning":
        beside = path / "tokenizer.model"
        if not beside.is_file():
            raise CheckpointError(f"{path} holds no tokenizer.model; pass --tokenizer PATH")
        return beside
    checkpoint = _torch_load(path)  # memory-mapped: the tensors are not read
    recorded = checkpoint.get("tokenizer_path") if isinstance(checkpoint, dict) else None
    if not isinstance(recorded, str):
        raise CheckpointError(f"{path} records no tokenizer_path (not written by a llama2_lit stage?); "
                              "pass --tokenizer PATH")
    if not Path(recorded).is_file():
        raise CheckpointError(f"{path} was trained with the tokenizer {recorded}, which does not exist (here, from "
                              f"{Path.cwd()}); pass --tokenizer PATH")
    return Path(recorded)


def load_checkpoint(path: str | Path, *, model: str = "model") -> tuple[dict[str, Tensor], ModelConfig]:
    """State dict in our (Meta's) names and the ``ModelConfig``, from any supported layout
    (``model``: which model of a multi-model stage ``.ckpt``, see ``load_model``).

    Tensors keep the checkpoint's dtype; files are memory-mapped, so tensors that needed no
    computation stay backed by the file until written to (copy on write).
    """
    loaded = _load(path, model=model)
    return {name: _materialize(value) for name, value in loaded.tensors.items()}, loaded.config


def load_model(path: str | Path, *, lm_head: bool = True, scalar_head: bool = False,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               model: str = "model") -> Transformer:
    """A ``Transformer`` with the checkpoint's weights (in ``dtype`` on ``device``).

    ``model`` names one model of a stage ``.ckpt`` that holds several (PPO's ``value``, ...;
    ``checkpoint["model_configs"]``); the default is the stage's main model.

    The model is built on the meta device and takes the loaded tensors, so no time is spent on an
    initialisation that is overwritten. A head the checkpoint lacks: ``score`` gets a fresh
    initialisation (reward models start from the SFT model, paper 3.2.2); a missing LM head is an
    error. A head the checkpoint has but the caller did not ask for is dropped.
    """
    loaded = _load(path, model=model)
    config = loaded.config
    if lm_head and "output.weight" not in loaded.tensors:
        raise CheckpointError(f"{loaded.source}: no LM head ('output.weight'); it is a scalar-head model "
                              "(load it with lm_head=False, scalar_head=True)")
    with torch.device("meta"):
        built = Transformer(config, lm_head=lm_head, scalar_head=scalar_head)
    wanted = built.state_dict().keys()
    state = {name: _materialize(value).to(device=device, dtype=dtype, copy=True)
             for name, value in loaded.tensors.items() if name in wanted}
    fresh_score = scalar_head and "score.weight" not in state
    if fresh_score:
        state["score.weight"] = torch.empty(1, config.dim, device=device, dtype=dtype)
    built.load_state_dict(state, strict=True, assign=True)
    if fresh_score:
        built.reset_score_head()
    return built


def convert(src: str | Path, dst: str | Path, *, to: Literal["lit", "hf"] = "lit",
            tokenizer_path: str | Path | None = None, dtype: torch.dtype | None = None,
            overwrite: bool = False) -> str:
    """Convert ``src`` (any layout) to ``dst`` in our layout or HF's; returns a one-line summary.

    The tokenizer is the one given, else the one found with the source (``tokenizer.model`` in
    its folder, or ``tokenizer_path`` of a Lightning checkpoint).
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"source and destination are the same path: {src}")
    start = time.perf_counter()
    loaded = _load(src)
    tensors = {name: _cast(value, dtype) for name, value in loaded.tensors.items()}
    tokenizer = tokenizer_path if tokenizer_path is not None else loaded.tokenizer_path
    if to == "lit":
        save_model(tensors, loaded.config, dst, tokenizer_path=tokenizer, overwrite=overwrite)
    elif to == "hf":
        export_hf(tensors, loaded.config, dst, tokenizer_path=tokenizer, overwrite=overwrite)
    else:
        raise ValueError(f"unknown target layout {to!r}; choose 'lit' or 'hf'")
    n_params = sum(math.prod(_shape(v)) for v in tensors.values())
    size = sum(p.stat().st_size for p in dst.iterdir())
    dtypes = ",".join(sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()}))
    details = ", ".join([*loaded.details, f"{n_params / 1e6:,.1f}M params", dtypes])
    return (f"converted {loaded.format} {src} ({loaded.config.name}: {details}) -> {to} {dst} "
            f"({size / 1e6:,.1f} MB, {f'with the tokenizer {tokenizer}' if tokenizer else 'no tokenizer'}) "
            f"in {time.perf_counter() - start:.1f} s")
