"""Mixed precision on CPUs: ``bf16-mixed`` where the CPU multiplies bf16 natively, fp32 elsewhere.

A config asks for ``trainer.precision: bf16-mixed``. On a GPU that is Lightning's usual autocast.
On a CPU it pays only where the CPU has bf16 matrix units (AVX512-BF16 or AMX-BF16): there a bf16
matmul runs several times faster than an fp32 one; elsewhere torch emulates bf16 and it runs
*slower* than fp32. So the CLI (``stages/cli.py``) resolves the request before the Trainer is
built (Lightning's Trainer only takes its own precision strings): on a CPU without bf16 units it
trains in ``32-true`` instead and says so in one line.

What ``bf16-mixed`` means here (Lightning's ``MixedPrecision`` plugin, ``torch.autocast``): the
weights, their gradients and AdamW's state stay fp32 (so checkpoints are fp32); matmuls and
attention run in bf16; RMSNorm, RoPE and the logits are fp32 as the model core computes them
(``llama2_lit.model``), and the loss is taken on those fp32 logits.

Set ``LLAMA2_LIT_NO_CPU_BF16=1`` to act as if the CPU had no bf16 units (the fallback path, e.g. to
compare with an fp32 run on the same machine).
"""

from __future__ import annotations

import os
from typing import Any

import torch

NO_CPU_BF16_ENV = "LLAMA2_LIT_NO_CPU_BF16"
# The precision values that mean "bf16 autocast" to Lightning ("bf16" is its old spelling).
_BF16_MIXED = ("bf16-mixed", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16).

    Read from ``torch.cpu.get_capabilities()`` (the CPU's feature flags, as torch sees them);
    False when ``LLAMA2_LIT_NO_CPU_BF16`` is set to anything but ``0``.
    """
    if os.environ.get(NO_CPU_BF16_ENV, "0") not in ("", "0"):
        return False
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _runs_on_cpu(accelerator: Any) -> bool:
    if isinstance(accelerator, str):
        if accelerator == "auto":
            return not (torch.cuda.is_available() or torch.backends.mps.is_available())
        return accelerator == "cpu"
    return type(accelerator).__name__ == "CPUAccelerator"


def resolve_precision(precision: Any, accelerator: Any) -> tuple[Any, str | None]:
    """The precision to build the Trainer with, and a note when it differs from the one asked for.

    ``bf16-mixed`` on a CPU without bf16 units becomes ``32-true`` (see the module docstring);
    everything else is returned unchanged.
    """
    if str(precision) not in _BF16_MIXED or not _runs_on_cpu(accelerator) or cpu_has_native_bf16():
        return precision, None
    why = f"{NO_CPU_BF16_ENV} is set" if os.environ.get(NO_CPU_BF16_ENV, "0") not in ("", "0") else \
        "this CPU has no bf16 matrix units (AVX512-BF16/AMX), so bf16 would be emulated and slower"
    return "32-true", f"note: trainer.precision {precision} -> 32-true ({why})"
