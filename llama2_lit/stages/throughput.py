"""Tokens per second and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s (PaLM, appendix B). The achieved FLOP/s count the
model's FLOPs only (``ModelConfig.flops_per_token``: 6N plus the attention products), never the
recomputation of activation checkpointing, so MFU is comparable across memory settings.

The peak is the honest part. On a GPU it is the datasheet's dense bf16 tensor-core peak (table
below, no sparsity); on a CPU there is no such number worth trusting, so it is *measured*: the best
FLOP/s of a large matmul on this machine with the threads torch uses, in the precision the run
computes in (fp32, or bf16 under ``bf16-mixed``: on a CPU with bf16 units a bf16 matmul is several
times faster, so an fp32 peak would overstate a bf16 run's MFU by as much). CPU MFU therefore says
"fraction of what a big matmul of this precision achieves here", not "fraction of the silicon's
peak".
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s. Matched as
# substrings of ``torch.cuda.get_device_name()``; the first match wins, so specific names come first.
GPU_BF16_PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


CPU_PEAK_MATMUL_SIZE = 2048
"""Side of the square matmul whose best FLOP/s is a CPU's peak (benchmarks use the same)."""


@dataclass(frozen=True)
class PeakFlops:
    """A peak FLOP/s and where the number comes from (shown next to every MFU we report)."""

    flops: float
    source: str


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                         size: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of a ``size``^3 matmul over ``repeats`` timed runs (after one warm-up)."""
    device = torch.device(device)
    # A private generator: measuring must not move the global RNG (exact resume depends on it).
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    torch.mm(a, b)  # warm-up: thread pool, kernels
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, *, bf16: bool) -> PeakFlops:
    """The peak that MFU is measured against on ``device`` (see the module docstring).

    ``bf16``: the run computes its matmuls in bf16/fp16 (mixed precision), so a tensor-core
    datasheet peak applies on a GPU, and a CPU's peak is measured with bf16 matrices; otherwise
    the peak is measured in fp32.
    """
    if device.type == "cuda" and bf16:
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK_FLOPS.items():
            if key in name:
                return PeakFlops(flops, f"datasheet dense bf16 peak of {name}")
        measured = measure_matmul_flops(device, torch.bfloat16, size=8192)
        return PeakFlops(measured, f"measured bf16 matmul peak of {name} (not in the datasheet table)")
    dtype, dtype_name = (torch.bfloat16, "bf16") if bf16 else (torch.float32, "fp32")
    # 2048^3 on a CPU, as ``benchmarks/`` measure it, so that a training log and ``make bench`` state
    # one MFU: on CPUs with AMX, 1024^3 reaches only ~70% of the bf16 matmul rate of 2048^3.
    size = 8192 if device.type == "cuda" else CPU_PEAK_MATMUL_SIZE
    measured = measure_matmul_flops(device, dtype, size=size)
    if device.type == "cuda":
        return PeakFlops(measured, f"measured {dtype_name} {size}^3 matmul peak of {torch.cuda.get_device_name(device)}")
    # A CPU shared with other work measures low (one busy core halves it), and an MFU against a
    # low peak overstates. The peak is the best this machine has ever measured for this dtype and
    # thread count, kept in a small cache file.
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.get_num_threads()}|{dtype_name}|{size}"
    best = max(measured, _remember_peak(key, measured))
    note = "" if best == measured else f", best ever on this machine; {measured / 1e9:.0f} now"
    return PeakFlops(best, f"measured {dtype_name} {size}^3 matmul peak of this CPU "
                           f"({torch.get_num_threads()} threads{note})")


PEAK_CACHE = Path(os.environ.get("LLAMA2_LIT_CACHE", Path.home() / ".cache" / "llama2_lit")) / "cpu_peak_flops.json"


def _remember_peak(key: str, measured: float) -> float:
    """The best peak recorded for ``key`` so far (``measured`` included), written back atomically.
    An unreadable or unwritable cache is ignored: the measurement alone is then used."""
    try:
        table = json.loads(PEAK_CACHE.read_text()) if PEAK_CACHE.is_file() else {}
    except (OSError, ValueError):
        table = {}
    best = max(float(table.get(key, 0.0)), measured)
    if best > float(table.get(key, 0.0)):
        try:
            PEAK_CACHE.parent.mkdir(parents=True, exist_ok=True)
            partial = PEAK_CACHE.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps({**table, key: best}, indent=1))
            os.replace(partial, PEAK_CACHE)
        except OSError:
            pass
    return best


class ThroughputMeter:
    """Counts tokens between two log points and turns them into tokens/s and MFU.

    Wall-clock time between log points includes everything a training step costs (data,
    optimizer, logging), which is what a training run's throughput is; validation is paused out.
    Nothing here waits on the device: the time is read when the metrics are logged, where the
    host syncs anyway.
    """

    def __init__(self, flops_per_token: float, peak: PeakFlops, world_size: int = 1) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self._tokens = 0
        self._start: float | None = None
        self._paused_at: float | None = None

    def start(self) -> None:
        self._tokens = 0
        self._start = time.perf_counter()

    def pause(self) -> None:
        """Stop the clock (validation runs inside a training window but is not training)."""
        if self._start is not None and self._paused_at is None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._start += time.perf_counter() - self._paused_at
            self._paused_at = None

    def update(self, tokens: int) -> None:
        """Add the tokens of one step on this rank."""
        self._tokens += tokens

    def compute(self) -> dict[str, float]:
        """Rates since the last ``start``/``compute``, summed over ranks; restarts the window."""
        if self._start is None:
            self.start()
            return {}
        elapsed = time.perf_counter() - self._start
        tokens = self._tokens * self.world_size
        self.start()
        if elapsed <= 0 or tokens == 0:
            return {}
        tokens_per_s = tokens / elapsed
        mfu = tokens_per_s * self.flops_per_token / (self.peak.flops * self.world_size)
        return {"tokens_per_s": tokens_per_s, "mfu": mfu}
