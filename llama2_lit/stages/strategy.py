"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` as plain FSDP2 with its knobs in YAML.

The stage's ``configure_model`` reads ``fsdp_options()`` and hands them to
``llama2_lit.parallelize.parallelize_model``; see that module for what each knob does.

    trainer:
      strategy:
        class_path: llama2_lit.stages.strategy.FSDP2Strategy
        init_args: {activation_checkpointing: true, param_dtype: bfloat16}

It is also registered by name: ``--trainer.strategy fsdp2`` (defaults: fp32, no activation
checkpointing) or ``fsdp2_bf16`` (bf16 compute, activation checkpointing: the GPU setting).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from llama2_lit.config import DTYPES, DType



class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (data-parallel mesh = world), with its knobs as arguments.

    Args:
        activation_checkpointing: recompute each block's activations in the backward pass.
        param_dtype: compute dtype of the gathered weights ("bfloat16" = mixed precision; keep the
            Trainer at ``precision: 32-true`` so master weights and optimizer state stay fp32).
            None: the parameters' own dtype.
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: ZeRO-3 (True) or keep gathered weights until backward (ZeRO-2-like).
        cpu_offload: keep shards, gradients and optimizer state in CPU memory.
        save_distributed_checkpoint: save a sharded checkpoint directory (True) or gather a full
            single-file checkpoint on rank 0 (False).
        process_group_backend: None picks gloo on CPU, NCCL on CUDA.
        timeout: collective timeout.
    """

    def __init__(self, activation_checkpointing: bool = False, param_dtype: DType | None = None,
                 reduce_dtype: DType = "float32", reshard_after_forward: bool = True, cpu_offload: bool = False,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.activation_checkpointing = activation_checkpointing
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload

    def setup_environment(self) -> None:
        # Pure data parallelism: one mesh dimension over every process of every node.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def fsdp_options(self) -> dict[str, Any]:
        """Keyword arguments of ``llama2_lit.parallelize.parallelize_model``."""
        return {
            "activation_checkpointing": self.activation_checkpointing,
            "param_dtype": None if self.param_dtype is None else DTYPES[self.param_dtype],
            "reduce_dtype": DTYPES[self.reduce_dtype],
            "reshard_after_forward": self.reshard_after_forward,
            "cpu_offload": self.cpu_offload,
        }


for _name, _options, _description in (
    ("fsdp2", {}, "FSDP2 over all processes (llama2_lit), fp32"),
    ("fsdp2_bf16", {"param_dtype": "bfloat16", "activation_checkpointing": True},
     "FSDP2 over all processes (llama2_lit), bf16 compute, activation checkpointing"),
):
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, FSDP2Strategy, description=_description, **_options)


def sharding_mesh(strategy: Any) -> Any | None:
    """The 1-D mesh to shard the model over, or None when the strategy does not shard it."""
    if not isinstance(strategy, ModelParallelStrategy):
        return None
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"tensor parallelism (tensor_parallel_size={mesh['tensor_parallel'].size()}) is not implemented for "
            "the llama2_lit model; use llama2_lit.stages.strategy.FSDP2Strategy (data parallel over all ranks)"
        )
    return mesh["data_parallel"]


def fsdp_options(strategy: Any) -> dict[str, Any]:
    """The FSDP knobs of ``strategy`` (defaults for a plain ``ModelParallelStrategy``)."""
    return strategy.fsdp_options() if isinstance(strategy, FSDP2Strategy) else {}
