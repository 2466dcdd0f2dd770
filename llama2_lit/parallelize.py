"""Parallelism applied from outside the model, torchtitan style (``parallelize_llama.py``).

``model.py`` describes only the math; this file decides how a ``Transformer`` is spread over
devices. A stage's ``configure_model`` (``llama2_lit.stages.base``) builds the model on the meta
device (no memory), then calls ``parallelize_model``:

1. ``apply_activation_checkpointing``: each ``TransformerBlock`` recomputes its activations in the
   backward pass instead of keeping them (memory ~ one block's activations instead of all of them,
   for ~1/3 more compute).
2. ``apply_fsdp``: FSDP2 (``fully_shard``) on each block, on each head, then on the root
   (embeddings, final norm). Each parameter becomes a ``DTensor`` sharded along dim 0 over the
   data-parallel ranks; a block's full weights exist only while that block runs (all-gather
   before, free after), and gradients are reduce-scattered back to shards. A mixed-precision
   policy computes in bf16 while the sharded fp32 master weights and the optimizer state stay fp32.

Then the stage materialises the sharded model (``to_empty`` + init or shard-wise loading, see
``StageModule.configure_model``).

Lightning's ``FSDPStrategy`` wraps FSDP1 and refuses CPUs; ``ModelParallelStrategy`` runs FSDP2
anywhere (gloo on CPU, NCCL on GPU) and leaves the parallelisation to ``configure_model``.
``llama2_lit.stages.strategy.FSDP2Strategy`` is that strategy with the data-parallel mesh spanning
every process and the FSDP knobs (activation checkpointing, mixed precision, resharding, CPU
offload) as arguments, so a YAML config selects them. It saves sharded checkpoints: a directory
per checkpoint, written by every rank in parallel with ``torch.distributed.checkpoint`` (DCP),
plus ``meta.pt`` with the rest of Lightning's checkpoint. ``consolidate_checkpoint`` turns such a
directory into one ``.ckpt`` that ``llama2-lit convert`` and ``init_from`` read.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama2_lit.model import Transformer

# Lightning's name for the non-tensor part of a sharded checkpoint (lightning.fabric.utilities.load).
_METADATA_FILENAME = "meta.pt"


# ------------------------------------------------------------------------------------ the model
def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each transformer block in the backward pass (full, per-block checkpointing).

    The wrapper keeps parameter names stable in state dicts (``torch.distributed.checkpoint``
    strips its ``_checkpoint_wrapped_module`` prefix), so checkpoints do not depend on this choice.
    The model has no dropout, so RNG state need not be replayed (``preserve_rng_state=False``).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.layers):
        model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_fsdp(model: Transformer, mesh: Any, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True,
               cpu_offload: bool = False) -> None:
    """Shard ``model`` with FSDP2 over the 1-D data-parallel ``mesh``: blocks, heads, then the root.

    Args:
        param_dtype: dtype the all-gathered weights are computed in (bf16 for mixed precision);
            None keeps the parameters' dtype. Master weights stay in their dtype (fp32).
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 keeps the sum exact enough).
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3); the
            last block is never resharded, since backward needs it at once (torchtitan).
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        fully_shard(block, reshard_after_forward=reshard_after_forward and index < last, **kwargs)
    # The heads are called directly by generation and reward code (``model.output(h)``), not only
    # through ``forward``: each is its own unit so that such a call gathers its weights.
    for head in (model.output, model.score):
        if head is not None:
            fully_shard(head, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    # Likewise ``hidden_states`` (generation's prefill and decode steps): gather the root's
    # weights (embeddings, final norm) when it is called directly.
    register_fsdp_forward_method(model, "hidden_states")


def parallelize_model(model: Transformer, mesh: Any, *, activation_checkpointing: bool = False,
                      **fsdp_options: Any) -> None:
    """Activation checkpointing (optional), then FSDP2 over ``mesh``, on a meta-device ``model``."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, mesh, **fsdp_options)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (FSDP2)."""
    return hasattr(next(model.parameters()), "to_local")


def prepare_for_inference_mode(model: Transformer, bos_id: int = 1) -> None:
    """Let a sharded model run under ``torch.inference_mode`` (generation) and train afterwards.

    FSDP2 allocates the buffers of the gathered weights at a module's first forward and reuses
    them. If that first forward runs in inference mode (``llama2_lit.generation.generate``), they
    are inference tensors, and a later training forward may not write into them. One tiny forward
    under ``no_grad`` first allocates them as ordinary tensors. A no-op for unsharded models.
    """
    if is_sharded(model):
        with torch.no_grad():
            model(torch.tensor([[bos_id]], device=next(model.parameters()).device))


def load_full_state_dict(model: nn.Module, full_state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict, present on rank 0 only, into a sharded model.

    Rank 0 passes the full state dict (CPU, possibly memory-mapped); the other ranks pass ``{}``.
    Each tensor is broadcast from rank 0 and every rank keeps only its own shard, so no rank ever
    holds the whole model on its accelerator, and only rank 0 reads the checkpoint file.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full_state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


# ------------------------------------------------------------------------------------ checkpoints
def is_sharded_checkpoint(path: str | Path) -> bool:
    """A DCP checkpoint directory as ``FSDP2Strategy``/``ModelParallelStrategy`` save it."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def load_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint directory as one full checkpoint dict, in a single process.

    Returns Lightning's checkpoint layout with the model weights only: ``state_dict`` (full
    tensors, keys ``model.*``), ``model_config``, ``tokenizer_path``, ``global_step``, ``epoch``,
    ``hyper_parameters``. Optimizer state, loops and RNG states are left out: this is for exporting
    and initialising, not for resuming (resume from the directory itself).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint directory (no {path / '.metadata'})")
    reader = dcp.FileSystemReader(str(path))
    prefix = "state_dict."
    weights: dict[str, torch.Tensor] = {}
    for key, item in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            weights[key[len(prefix):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not weights:
        raise ValueError(f"{path}: the sharded checkpoint holds no model weights under 'state_dict'")
    state = {"state_dict": weights}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose
        dcp.load(state, storage_reader=reader, no_dist=True)
    metadata_file = path / _METADATA_FILENAME
    metadata = torch.load(metadata_file, map_location="cpu", weights_only=True) if metadata_file.is_file() else {}
    keep = ("model_config", "model_configs", "tokenizer_path", "global_step", "epoch", "hyper_parameters", "pytorch-lightning_version")
    checkpoint = {key: metadata[key] for key in keep if key in metadata}
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint


def consolidate_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write the sharded checkpoint directory ``src`` as one ``.ckpt`` file ``dst`` (atomically)."""
    checkpoint = load_sharded_checkpoint(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, dst)
    return dst
