"""What every checkpoint format shares: the error type, lazy tensors, validation against a
``ModelConfig``, safe file readers and the streaming, atomic writers."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import Tensor, nn

from llama2_lit.config import PRESETS, ModelConfig
from llama2_lit.model import Transformer

Format = Literal["lit", "meta", "hf", "lightning"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config; the message names the file and tensor."""


# ============================================================================ lazy tensors
@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype, computed only when ``materialize()`` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    compute: Callable[[], Tensor]

    def materialize(self) -> Tensor:
        return self.compute()


TensorLike = Tensor | LazyTensor


def _shape(value: TensorLike) -> tuple[int, ...]:
    return tuple(value.shape)


def _materialize(value: TensorLike) -> Tensor:
    return value.materialize() if isinstance(value, LazyTensor) else value


def _lazy_apply(value: TensorLike, fn: Callable[[Tensor], Tensor]) -> TensorLike:
    """``fn(value)`` now for a real tensor; deferred for a lazy one (``fn`` keeps shape and dtype)."""
    if isinstance(value, LazyTensor):
        return LazyTensor(value.shape, value.dtype, lambda: fn(value.materialize()))
    return fn(value)


def _cast(value: TensorLike, dtype: torch.dtype | None) -> TensorLike:
    if dtype is None or value.dtype == dtype:
        return value
    # Deferred even for real tensors: a cast of a memory-mapped file is a new full copy.
    return LazyTensor(_shape(value), dtype, lambda: _materialize(value).to(dtype))


# Per-layer tensor names: ``layers.<i>.<name>``.
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


# ============================================================================ validation
def expected_shapes(config: ModelConfig, *, lm_head: bool = True, scalar_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``Transformer`` with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(config, lm_head=lm_head, scalar_head=scalar_head)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_state_dict(state_dict: Mapping[str, TensorLike], config: ModelConfig, *, source: str) -> None:
    """Every tensor present with the shape ``config`` implies, nothing else; else a ``CheckpointError``.

    Which heads are expected (``output``, ``score``) is read from the state dict; one is required.
    """
    lm_head, scalar_head = "output.weight" in state_dict, "score.weight" in state_dict
    if not (lm_head or scalar_head):
        raise CheckpointError(f"{source}: no head: neither 'output.weight' (LM head) nor 'score.weight' (scalar head)")
    expected = expected_shapes(config, lm_head=lm_head, scalar_head=scalar_head)
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}"
                              + _and_more(unexpected) + " (not part of a Llama 2 model)")
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}" + _and_more(missing))
    for name, shape in expected.items():
        if _shape(state_dict[name]) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {_shape(state_dict[name])} but the config "
                                  f"({_describe(config)}) implies {shape}")


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more: {', '.join(names[1:4])}{', ...' if len(names) > 4 else ''})" \
        if len(names) > 1 else ""


def _describe(config: ModelConfig) -> str:
    return (f"dim={config.dim}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
            f"n_kv_heads={config.n_kv_heads}, hidden_dim={config.hidden_dim}, vocab_size={config.vocab_size}")


def _named_like_preset(config: ModelConfig, fallback: str) -> ModelConfig:
    """Name an imported config after the preset with the same shapes (``llama2-7b``), else ``fallback``."""
    # The same tensors and the same numerics (a preset names a released model, not only a shape).
    same_model = (*ModelConfig.shape_fields(), "norm_eps", "rope_theta")
    for name, preset in PRESETS.items():
        if all(getattr(preset, f) == getattr(config, f) for f in same_model):
            return dataclasses.replace(config, name=name, unconfirmed=preset.unconfirmed, notes=preset.notes)
    return dataclasses.replace(config, name=fallback)


# ============================================================================ file readers
def _torch_load(path: Path) -> dict:
    """``torch.load`` that only unpickles tensors and plain containers, memory-mapped."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "zipfile" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 format: no mmap
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), None)
        if reason is None:  # not a refused object: a damaged or foreign file
            detail = next((line for line in str(error).splitlines() if "Unsupported" in line), str(error)[:200])
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail.strip()})") from None
        raise CheckpointError(
            f"{path}: refusing to unpickle it: it holds more than tensors and plain containers ({reason}). "
            "Checkpoints are loaded with torch.load(weights_only=True) so that a file cannot run code."
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, memory-mapped (not read until used)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


@dataclass
class _Loaded:
    """What a reader found: tensors in our names (maybe lazy), the config, and where they came from."""

    tensors: dict[str, TensorLike]
    config: ModelConfig
    format: Format
    source: str
    tokenizer_path: Path | None = None
    details: list[str] = field(default_factory=list)


# ============================================================================ writers
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: str | Path, tensors: Mapping[str, TensorLike], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file one tensor at a time; returns its size in bytes.

    ``safetensors.torch.save_file`` first turns every tensor into a bytes object (a second copy of
    the whole model); this writer materialises, writes and frees one tensor at a time. Format: an
    8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets; padded
    with spaces to 8 bytes), then the raw little-endian data.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, value in tensors.items():
        if value.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {value.dtype} has no safetensors code")
        size = math.prod(_shape(value)) * value.dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[value.dtype], "shape": list(_shape(value)),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(len(header_bytes).to_bytes(8, "little"))
        file.write(header_bytes)
        for name, value in tensors.items():
            tensor = _materialize(value).detach().to("cpu").contiguous()
            if tuple(tensor.shape) != tuple(header[name]["shape"]) or tensor.dtype != value.dtype:
                raise CheckpointError(f"tensor {name!r} materialised as {tuple(tensor.shape)} {tensor.dtype}, "
                                      f"announced as {header[name]['shape']} {value.dtype}")
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return 8 + len(header_bytes) + offset


@contextmanager
def _atomic_directory(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``out_dir``, on failure it vanishes.

    An existing non-empty ``out_dir`` is an error unless ``overwrite``; it is replaced only after
    the new folder is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (out_dir.is_file() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty (overwrite=True / --overwrite replaces it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = tmp.with_suffix(".old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _as_state_dict(model_or_state_dict: nn.Module | Mapping[str, TensorLike]) -> dict[str, TensorLike]:
    if isinstance(model_or_state_dict, nn.Module):
        return {name: tensor.detach() for name, tensor in model_or_state_dict.state_dict().items()}
    return {name: value.detach() if isinstance(value, Tensor) else value for name, value in model_or_state_dict.items()}


def _copy_tokenizer(tokenizer_path: str | Path | None, out_dir: Path) -> Path | None:
    if tokenizer_path is None:
        return None
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_path}")
    return Path(shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model"))
