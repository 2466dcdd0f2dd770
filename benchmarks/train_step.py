"""Training-step speed: our ``Transformer`` against HF ``LlamaForCausalLM``, same config, same math.

One step = forward, cross-entropy over all positions, backward, fused AdamW (the paper's settings,
section 2.2: betas 0.9/0.95, eps 1e-5, weight decay 0.1), on the same weights, in two precisions:

* ``fp32``: everything fp32;
* ``bf16``: the forward and the loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``, what
  Lightning's ``precision: bf16-mixed`` does (fp32 weights, gradients and AdamW state; bf16
  matmuls and attention; the loss on fp32 logits).

HF runs with ``attn_implementation="sdpa"``, the same attention kernel we call. Reported per size
and precision: tokens/s of each, their ratio, and MFU = ``ModelConfig.flops_per_token`` x tokens/s
over the best matmul throughput *of that precision* (fp32 or bf16 ``2048^3``), timed in the same
rounds as the steps. ``--compile`` also measures both models under ``torch.compile`` (fp32 only;
~15-30 s of compilation per model on a CPU).

Measurements are interleaved (ours, HF, ours, HF, ...) and summarised by medians, so load from
other processes hits both sides equally. This is a benchmark, not a test: nothing is asserted.

What to expect on a CPU: both steps run the same matmuls (~70% of the time) and the same flash
attention kernel (~15%), so eager throughput is close; on a CPU with bf16 units (AVX512-BF16, AMX)
bf16 matmuls run several times faster than fp32 ones, so the bf16 step is the faster one and the
element-wise work around the matmuls (fp32 norms, casts) weighs more. Our attention runs in fp32
under CPU autocast (torch's CPU flash attention is slower in bf16); HF's runs in bf16.

    python benchmarks/train_step.py                      # micro and mini, seq 256, batch 8, fp32 and bf16
    python benchmarks/train_step.py --sizes micro --precisions bf16 --rounds 3 --threads 1
    python benchmarks/train_step.py --sizes micro --profile   # top ops of one eager step of each
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MATMUL_N, environment_line, hf_twin, interleaved_times, matmul_timer, print_table  # noqa: E402

from llama2_lit.config import ModelConfig  # noqa: E402
from llama2_lit.model import Transformer  # noqa: E402
from llama2_lit.stages.precision import cpu_has_native_bf16  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    # Fused, as both sides train: our stages, and HF's Trainer by default (``adamw_torch_fused``).
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=True)


def autocast(precision: str):
    """The context of a step's forward and loss: bf16 autocast (as Lightning's bf16-mixed), or none."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(logits_of: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                  tokens: torch.Tensor, targets: torch.Tensor, precision: str = "fp32") -> Callable[[], float]:
    """A closure running one full training step and returning its loss."""
    def step() -> float:
        with autocast(precision):
            # fp32 logits on both sides (ours are already; HF's head output is bf16 under autocast).
            logits = logits_of(tokens).float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def contenders(config: ModelConfig, tokens: torch.Tensor, targets: torch.Tensor, *, precisions: list[str],
               compile_: bool) -> tuple[dict[str, Callable[[], float]], dict[str, float]]:
    """Training-step closures for each variant (each owns its model and optimizer), and compile times.

    Variants are named ``"<ours|hf> <precision>[ compiled]"``.
    """
    ours = Transformer(config)
    variants: dict[str, torch.nn.Module] = {}
    for precision in precisions:
        twin = Transformer(config)
        twin.load_state_dict(ours.state_dict())
        variants.update({f"ours {precision}": twin, f"hf {precision}": hf_twin(ours, attn_implementation="sdpa")})
    if compile_:
        ours_c = Transformer(config)
        ours_c.load_state_dict(ours.state_dict())
        variants.update({"ours fp32 compiled": ours_c, "hf fp32 compiled": hf_twin(ours, attn_implementation="sdpa")})
    steps, compile_seconds = {}, {}
    for name, model in variants.items():
        model.train()
        forward = torch.compile(model) if name.endswith("compiled") else model
        logits_of = (lambda m: (lambda x: m(x)))(forward) if name.startswith("ours") else \
            (lambda m: (lambda x: m(input_ids=x).logits))(forward)
        steps[name] = training_step(logits_of, adamw(model), tokens, targets, precision=name.split()[1])
        start = time.perf_counter()
        steps[name]()  # warm-up; for compiled variants this is the compilation
        compile_seconds[name] = time.perf_counter() - start
    return steps, compile_seconds


def first_step_losses(config: ModelConfig, tokens: torch.Tensor, targets: torch.Tensor,
                      precision: str = "fp32") -> tuple[float, float]:
    """Loss of the first step of fresh twins: the two sides compute the same function."""
    ours = Transformer(config)
    hf = hf_twin(ours)
    loss_ours = training_step(lambda x: ours(x), adamw(ours), tokens, targets, precision)()
    loss_hf = training_step(lambda x: hf(input_ids=x).logits, adamw(hf), tokens, targets, precision)()
    return loss_ours, loss_hf


def profile_eager_steps(config: ModelConfig, tokens: torch.Tensor, targets: torch.Tensor, top: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    ours = Transformer(config).train()
    hf = hf_twin(ours).train()
    for name, logits_of, model in (("ours", lambda x: ours(x), ours), ("hf", lambda x: hf(input_ids=x).logits, hf)):
        step = training_step(logits_of, adamw(model), tokens, targets)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n--- {name}: top {top} ops of one eager training step (self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["micro", "mini"])
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant (interleaved)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="also measure torch.compile'd models in fp32 (~15-30 s of compilation per model on a CPU)")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one eager step of each")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is steadier on a crowded machine)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"train_step benchmark: {environment_line()}")
    bf16_units = "has" if cpu_has_native_bf16() else "has NO"
    print(f"batch {args.batch_size} x seq {args.seq_len}, AdamW, {', '.join(args.precisions)} (bf16 = autocast, "
          f"fp32 weights; this CPU {bf16_units} bf16 matrix units); {args.rounds} interleaved rounds, medians. "
          f"MFU is against the best {MATMUL_N}^3 matmul of the same precision, timed in the same rounds.")
    rows, ratios, peaks = [], [], []
    for size in args.sizes:
        config = ModelConfig.from_name(size)
        tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        losses = {p: first_step_losses(config, inputs, targets, p) for p in args.precisions}
        if args.profile:
            profile_eager_steps(config, inputs, targets)
        steps, compile_seconds = contenders(config, inputs, targets, precisions=args.precisions,
                                            compile_=args.compile)
        # The matmuls are more contenders, timed in the same rounds as the steps; the best time of
        # each (the least disturbed by other processes) is its precision's peak.
        matmuls = {f"matmul {p}": matmul_timer(dtype=PRECISIONS[p]) for p in args.precisions}
        times = interleaved_times({**steps, **matmuls}, args.rounds)
        peak = {p: 2 * MATMUL_N**3 / min(times.pop(f"matmul {p}")) for p in args.precisions}
        seconds = {name: statistics.median(values) for name, values in times.items()}
        peaks.append(f"{size}: " + ", ".join(f"{p} {peak[p] / 1e9:.0f}" for p in args.precisions))
        n_tokens = args.batch_size * args.seq_len
        flops_per_token = config.flops_per_token(args.seq_len)
        for name, t in seconds.items():
            tokens_per_s = n_tokens / t
            warm = f"{compile_seconds[name]:.1f}" if name.endswith("compiled") else "-"
            rows.append([size, name, f"{tokens_per_s:,.0f}", f"{t * 1e3:,.0f}",
                         f"{100 * tokens_per_s * flops_per_token / peak[name.split()[1]]:.1f}%", warm])
        for p in args.precisions:
            ratios.append([size, f"ours {p} / hf {p}", f"{seconds[f'hf {p}'] / seconds[f'ours {p}']:.2f}x"])
            # At 100% MFU a step takes flops / peak: no implementation of the same math can beat HF
            # by more than HF's time over that (= 1 / HF's MFU).
            ceiling = seconds[f"hf {p}"] * peak[p] / (n_tokens * flops_per_token)
            ratios.append([size, f"ceiling for ours {p} / hf {p} (100% MFU)", f"{ceiling:.2f}x"])
            loss_ours, loss_hf = losses[p]
            ratios.append([size, f"first-step loss |ours - hf| ({p})", f"{abs(loss_ours - loss_hf):.1e}"])
        if {"fp32", "bf16"} <= set(args.precisions):
            ratios.append([size, "ours bf16 / ours fp32", f"{seconds['ours fp32'] / seconds['ours bf16']:.2f}x"])
        if args.compile:
            for a, b in (("ours fp32 compiled", "hf fp32 compiled"), ("ours fp32 compiled", "hf fp32")):
                ratios.append([size, f"{a} / {b}", f"{seconds[b] / seconds[a]:.2f}x"])
    print(f"matmul peaks (GFLOP/s): {'; '.join(peaks)}")
    print()
    print_table(["size", "variant", "tokens/s", "step ms", "MFU", "compile s"], rows)
    print()
    print_table(["size", "comparison", "value"], ratios)
    print("\nRatios are tokens/s of the first over the second (>1: the first is faster). "
          "Shared machines are noisy: compare ratios, not absolute numbers.")


if __name__ == "__main__":
    main()
