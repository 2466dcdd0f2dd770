"""Rollout engines: where RLHF generates, and how it gets the policy's current weights there.

Paper section 3.2.3 (training details of RLHF): generation under FSDP was "≈20× slower" even with
a large batch and a KV cache, and was fixed by "consolidating the model weights to each node once
before generation and then freeing the memory after generation, resuming the rest of the training
loop". The cause: FSDP keeps each layer's weights sharded and all-gathers them before every forward
pass. Training runs one forward per batch, so that traffic hides behind the compute; decoding runs
one forward *per token*, each a tiny amount of compute behind a full all-gather of the model.

A rollout phase therefore goes through a small contract, ``RolloutEngine``:

* ``sync_weights(policy)``: make the policy's current weights available to the engine;
* ``generate(prompts, **options)``: sample (``llama2_lit.generation.generate``'s options, its
  ``GenerationOutput``);
* ``release()``: give the memory back to training.

``with engine.rollout(policy): ...`` does the three in order (release even on error). The engines:

* ``ConsolidatedRollout``, the paper's fix: ``sync_weights`` all-gathers the FSDP2 shards once
  into an unsharded inference copy, ``generate`` runs the KV-cached decoder on that copy with no
  communication at all, ``release`` frees it. A model that is not sharded (one process, DDP) is
  used as it is, with no copy: the contract is the same, so a stage need not know how it runs.
* ``ShardedRollout``, the naive path the paper measured: generate from the sharded module itself
  (every decode step all-gathers every layer). Kept for comparison and for models whose
  unsharded copy does not fit one device.

A GPU inference engine (vLLM, SGLang) plugs in as another ``RolloutEngine``: ``sync_weights``
pushes the gathered weights into its workers, ``generate`` calls it, ``release`` sleeps it.

**One copy per node.** The paper does not say how the consolidated weights are laid out within a
node. ``ConsolidatedRollout`` gives *every rank* its own full copy, on its own device, gathered
with FSDP's own all-gather, one collective per FSDP unit (``FSDPModule.unshard``). On a node of
GPUs that is one copy per GPU, and each rank then generates its own share of the prompts,
independently: decoding needs no collective, so ranks need not run the same number of decode
steps (under FSDP they must, or they deadlock), and all the node's GPUs generate at once. The
alternative, one copy on local rank 0 while the other GPUs wait, would leave most of the node
idle during the phase that dominates an RLHF step. On CPU (the tests) every process of the node
holds a copy in host memory. Where a model's copy does not fit one device even in bf16 (70B on
80 GB GPUs), the node's GPUs must share one copy with tensor parallelism: that is the inference
engine's job behind this seam.

Peak memory during ``sync_weights``: the rank's shards, the copy, and one FSDP unit's gathered
weights at a time (a block, a head, or the embeddings with the final norm), which are copied in
and freed before the next unit is gathered. The sync moves the model once; the naive path moves
it once per generated token (``benchmarks/rollout.py`` times both). Log-probs returned by
``generate`` are the copy's: in bf16 they differ slightly from the fp32 policy's, so PPO should
recompute the old log-probs with the policy itself (``generation.sequence_logprobs``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from llama2_lit.generation import GenerationOutput, generate
from llama2_lit.model import Transformer
from llama2_lit.parallelize import is_sharded, prepare_for_inference_mode


class RolloutEngine(ABC):
    """Generates from a policy that is being trained: ``sync_weights`` / ``generate`` / ``release``.

    Call ``sync_weights`` after every optimizer step that should be visible to the next rollout
    (PPO: once per iteration), ``release`` when the rollout phase is over. ``generate`` between the
    two; calling it outside is an error.
    """

    @abstractmethod
    def sync_weights(self, policy: Transformer) -> None:
        """Take the policy's current weights (sharded or not) for the next ``generate`` calls."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], **options: Any) -> GenerationOutput:
        """Sample continuations: ``options`` are those of ``llama2_lit.generation.generate``."""

    @abstractmethod
    def release(self) -> None:
        """Free what ``sync_weights`` allocated; the engine holds no weights afterwards."""

    @contextmanager
    def rollout(self, policy: Transformer) -> Iterator[RolloutEngine]:
        """``with engine.rollout(policy) as engine: engine.generate(...)``: sync, then release."""
        self.sync_weights(policy)
        try:
            yield self
        finally:
            self.release()


class ConsolidatedRollout(RolloutEngine):
    """The paper's fix (section 3.2.3): gather the full weights once, generate unsharded, free them.

    Args:
        dtype: dtype of the inference copy and its KV cache (``torch.bfloat16`` for large models).
            None: the dtype FSDP computes in (its mixed-precision ``param_dtype``, else the
            parameters' own), so the copy computes exactly what the sharded forward computes. An
            unsharded policy is used as it is, in its own dtype: a copy in another dtype would
            double the memory we save.
        device: where the copy lives. Default: where FSDP computes (this rank's GPU, or the CPU).

    ``sync_weights`` on a policy that is already synced copies the new weights into the existing
    copy (no allocation); after ``release`` the next sync builds the copy again.
    """

    def __init__(self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._model: Transformer | None = None
        self._copied = False

    @property
    def model(self) -> Transformer:
        """The model ``generate`` runs on: the unsharded copy, or the policy itself if it is not sharded."""
        if self._model is None:
            raise RuntimeError("the rollout engine holds no weights: call sync_weights(policy) first")
        return self._model

    @property
    def holds_copy(self) -> bool:
        """Whether the engine holds its own consolidated copy (False: none, or the policy itself)."""
        return self._model is not None and self._copied

    def sync_weights(self, policy: Transformer) -> None:
        if not is_sharded(policy):
            self._model, self._copied = policy, False
            return
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        # FSDP's units: each block, each head, the root (``parallelize.apply_fsdp``). Blocks that
        # are not resharded after forward (the last one) may still hold gathered weights from an
        # earlier forward; free them first.
        units = [module for module in policy.modules() if isinstance(module, FSDPModule)]
        for unit in units:
            unit.reshard()
        copied: set[str] = set()
        targets: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for unit in units:
                # The all-gather FSDP runs before this unit's forward (one collective per unit, in
                # its mixed-precision dtype, onto the device it computes on), run once here
                # instead of at every decode step.
                unit.unshard()
                gathered = [(_model_name(name), parameter) for name, parameter in policy.named_parameters()
                            if not isinstance(parameter, DTensor) and _model_name(name) not in copied]
                if gathered and not copied:
                    targets = self._prepare_copy(policy, gathered[0][1])
                for name, parameter in gathered:
                    if name not in targets:
                        raise ValueError(f"the policy's parameter {name!r} is not one of a llama2_lit Transformer")
                    targets[name].copy_(parameter)
                    copied.add(name)
                unit.reshard()  # one unit's gathered weights alive at a time
        if not copied or copied != set(targets):
            raise ValueError(f"the policy's FSDP units do not hold the parameters {sorted(set(targets) - copied)}")

    def generate(self, prompts: Sequence[Sequence[int]], **options: Any) -> GenerationOutput:
        return generate(self.model, prompts, **options)

    def release(self) -> None:
        # Dropping the last reference frees the copy's storage (on GPUs it returns to the caching
        # allocator, where training's next activations reuse it). The policy itself is only unreferenced.
        self._model, self._copied = None, False

    # ------------------------------------------------------------------------------ helpers
    def _prepare_copy(self, policy: Transformer, gathered: torch.Tensor) -> dict[str, torch.Tensor]:
        """The copy's parameters by name: the copy already held if it has the right shape, dtype and
        device (its storage is reused), else a new one. Default dtype and device: the gathered
        weights' (FSDP's compute dtype and device)."""
        dtype, device = self.dtype or gathered.dtype, self.device or gathered.device
        copy = self._model if self.holds_copy else None
        if copy is not None:
            parameter = next(copy.parameters())
            if not (copy.config == policy.config and (copy.output is None) == (policy.output is None)
                    and (copy.score is None) == (policy.score is None) and parameter.dtype == dtype
                    and parameter.device == device):
                copy = None
        if copy is None:
            self._model = None  # free the old copy before allocating the new one
            copy = self._empty_copy(policy, dtype, device)
            self._model, self._copied = copy, True
        return dict(copy.named_parameters())

    @staticmethod
    def _empty_copy(policy: Transformer, dtype: torch.dtype, device: torch.device) -> Transformer:
        """An uninitialised ``Transformer`` of the policy's shape: built on the meta device (no
        memory, no init), cast there, then allocated once on ``device``."""
        with torch.device("meta"):
            copy = Transformer(policy.config, lm_head=policy.output is not None,
                               scalar_head=policy.score is not None)
        copy = copy.to(dtype).to_empty(device=device)
        return copy.eval().requires_grad_(False)


class ShardedRollout(RolloutEngine):
    """The naive path: generate from the FSDP-sharded module itself.

    Every decode step runs each FSDP unit's pre-forward all-gather (every block, the heads, the
    root), so a response of n tokens moves the whole model n times; this is what paper section
    3.2.3 measured at ≈20× slower. The all-gathers are collectives: **every rank must call
    ``generate`` as often as the others and run as many decode steps** (the same prompts decoded
    greedily, or ``eos_id=None``), or the ranks deadlock. An unsharded model generates as usual.
    """

    def __init__(self) -> None:
        self._model: Transformer | None = None

    @property
    def model(self) -> Transformer:
        if self._model is None:
            raise RuntimeError("the rollout engine holds no weights: call sync_weights(policy) first")
        return self._model

    def sync_weights(self, policy: Transformer) -> None:
        prepare_for_inference_mode(policy)  # the weights are the policy's own; only FSDP's buffers need care
        self._model = policy

    def generate(self, prompts: Sequence[Sequence[int]], **options: Any) -> GenerationOutput:
        return generate(self.model, prompts, **options)

    def release(self) -> None:
        if self._model is not None and is_sharded(self._model):
            from torch.distributed.fsdp import FSDPModule

            for module in self._model.modules():  # the last block keeps its gathered weights after forward
                if isinstance(module, FSDPModule):
                    module.reshard()
        self._model = None


def _model_name(name: str) -> str:
    """A parameter's name in ``model.py`` terms: wrappers insert private path components
    (activation checkpointing's ``_checkpoint_wrapped_module``, ``torch.compile``'s ``_orig_mod``)."""
    return ".".join(part for part in name.split(".") if not part.startswith("_"))


__all__ = ["ConsolidatedRollout", "RolloutEngine", "ShardedRollout"]
