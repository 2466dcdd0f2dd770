"""Shared helpers for the benchmarks: the HF twin of a model, a matmul peak, interleaved timing.

Benchmarks compare our code with Hugging Face ``transformers`` on the same machine, in the same
process, on the same weights. Timings on a shared machine are noisy, so measurements of the
contenders are interleaved (ours, HF, ours, HF, ...) and summarised by medians: a burst of load
from elsewhere hits both sides alike.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llama2_lit.checkpoints import hf_config_dict, meta_to_hf_state_dict
from llama2_lit.model import Transformer
from llama2_lit.stages.throughput import CPU_PEAK_MATMUL_SIZE

REPO_ROOT = Path(__file__).resolve().parents[1]


def hf_twin(model: Transformer, *, attn_implementation: str = "sdpa"):
    """A ``transformers.LlamaForCausalLM`` holding the same weights as ``model`` (same logits)."""
    import transformers

    values = hf_config_dict(model.config, dtype=next(model.parameters()).dtype)
    for key in ("architectures", "model_type", "dtype"):
        values.pop(key)
    hf_config = transformers.LlamaConfig(**values, attn_implementation=attn_implementation, use_cache=False)
    hf = transformers.LlamaForCausalLM(hf_config).to(next(model.parameters()).dtype)
    state = {name: tensor.clone() for name, tensor in meta_to_hf_state_dict(model.state_dict(), model.config).items()}
    hf.load_state_dict(state, strict=True)
    return hf


MATMUL_N = CPU_PEAK_MATMUL_SIZE  # the training log's CPU peak is measured at the same size


def matmul_timer(n: int = MATMUL_N, dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A closure doing one ``n x n`` matmul (``2 n^3`` FLOPs): time it for the machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (thread pool, MKL/oneDNN kernels)
    return lambda: a @ b


def matmul_peak_flops(n: int = MATMUL_N, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n`` matmul over ``repeats`` tries."""
    run = matmul_timer(n, dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def interleaved_times(contenders: dict[str, Callable[[], object]], rounds: int, *,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each contender's call, calling them in turn (A, B, A, B, ...) ``rounds`` times.

    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU time only,
    which a single-threaded run on a crowded machine is not charged for while it waits for a core.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    return times


def interleaved_medians(contenders: dict[str, Callable[[], object]], rounds: int, *,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each contender's call, measured interleaved (see ``interleaved_times``)."""
    times = interleaved_times(contenders, rounds, clock=clock)
    return {name: statistics.median(values) for name, values in times.items()}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"{commit}{' (uncommitted changes)' if dirty else ''}" if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_line() -> str:
    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, git {git_commit()}, "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
