"""Generation speed: ``llama2_lit.generation.generate`` against Hugging Face ``generate``.

Both sides hold the same weights (``LlamaForCausalLM`` through ``checkpoints.meta_to_hf_state_dict``),
get the same left-padded prompts and generate exactly ``--new-tokens`` tokens per row: EOS is
disabled on both (ours: ``eos_id=None``; HF: ``eos_token_id=None``), so both do the same work.
Runs are interleaved (ours, HF, ours, HF, ...) and medians reported, because the machine is
shared. Greedy runs also check that both produce the same tokens.

``--dtypes float32 bfloat16`` (the default) runs every comparison twice: with fp32 weights and KV
cache on both sides, and with bf16 ones (``model.to(torch.bfloat16)`` and the same for HF; logits
and sampling stay fp32 on our side), the option for models whose weights dominate memory traffic.
``--dtypes bf16-mixed`` adds fp32 weights with both sides under ``torch.autocast(device, bfloat16)``:
how PPO, Ghost Attention and context distillation generate inside a ``bf16-mixed`` trainer.

A second table times ``generate`` through ``FusedDecoder`` against the model's own modules
(``generate(..., fused=False)``), greedy, in each of those precisions, and checks their tokens agree.

A third table times ragged batches (rows stop at different steps, as in RLHF rollouts) with and
without dropping finished rows from the decoding batch (``generate(drop_finished=...)``).

    python benchmarks/generation.py                      # micro + mini, batch 1 and 16, greedy + sampling
    python benchmarks/generation.py --sizes micro --batches 16 --profile

On a shared machine use ``--threads 1``: with two OpenMP threads and other jobs running, a
descheduled thread stalls every operator's barrier and timings swing by 10x. With one thread,
``--clock cpu`` times this process's CPU time instead of wall time, so the time spent waiting for
a core while other jobs run is charged to neither side (cache and memory contention still are).

``--profile`` adds, for our side, the operators dispatched per decode step (ours and HF's) and a
torch.profiler table of where our decode time goes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment_line, hf_twin, interleaved_medians, print_table  # noqa: E402

from llama2_lit.config import ModelConfig  # noqa: E402
from llama2_lit.decoding import FusedDecoder, fused_decoder  # noqa: E402
from llama2_lit.generation import generate, sample_next_token  # noqa: E402
from llama2_lit.model import KVCache, Transformer  # noqa: E402


def make_prompts(batch: int, vocab_size: int, seed: int) -> list[list[int]]:
    """BOS + 15..46 random tokens (ragged, so batches are left-padded); 32 tokens for batch 1."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(15, 47, (batch,), generator=g).tolist() if batch > 1 else [32]
    return [[1] + torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def synchronized(fn, device: torch.device):
    def run():
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result
    return run


def build(size: str, device: torch.device):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(size)).to(device).eval()
    hf = hf_twin(model).to(device).eval()
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like eos_id=None on our side
    return model, hf


def precision(dtype: str, device: torch.device):
    """The context generation runs in: bf16 autocast for ``bf16-mixed`` (as Lightning's), else none."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16-mixed" else contextlib.nullcontext()


def within(context_factory, fn):
    def run():
        with context_factory():
            return fn()
    return run


def bench_vs_hf(model, hf, batch: int, mode: str, new_tokens: int, rounds: int, device: torch.device,
                clock=time.perf_counter, dtype: str = "float32") -> list[str]:
    context = lambda: precision(dtype, device)  # noqa: E731
    prompts = make_prompts(batch, model.config.vocab_size, seed=batch)
    ids, mask = left_pad(prompts, device)
    temperature = 0.0 if mode == "greedy" else 0.7
    hf_sampling = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=temperature,
                                                                       top_p=1.0, top_k=0)

    def ours():
        return generate(model, prompts, max_new_tokens=new_tokens, temperature=temperature, top_p=1.0,
                        eos_id=None, generator=0)

    def theirs():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None,
                               pad_token_id=0, use_cache=True, **hf_sampling)

    ours, theirs = within(context, ours), within(context, theirs)
    ours_out, hf_out = ours(), theirs()  # warm-up (allocator, MKL/oneDNN plans); also the parity check
    assert ours_out.response_ids.shape == (batch, new_tokens), ours_out.response_ids.shape
    assert hf_out.shape == (batch, ids.shape[1] + new_tokens), hf_out.shape
    same = "n/a" if mode != "greedy" else \
        f"{(hf_out[:, ids.shape[1]:] == ours_out.response_ids).float().mean().item():.3f}"
    with context():
        floor = synchronized(weight_matmuls(model, batch, device), device)
    seconds = interleaved_medians({"ours": synchronized(ours, device), "hf": synchronized(theirs, device),
                                   "floor": lambda: [floor() for _ in range(new_tokens)]}, rounds, clock=clock)
    ours_tps, hf_tps = batch * new_tokens / seconds["ours"], batch * new_tokens / seconds["hf"]
    return [model.config.name, dtype, str(batch), mode, f"{ours_tps:.0f}", f"{hf_tps:.0f}", f"{ours_tps / hf_tps:.2f}x",
            f"{seconds['hf'] / seconds['floor']:.2f}x", same]


def weight_matmuls(model: Transformer, batch: int, device: torch.device):
    """One decode step's unavoidable work: every weight matrix times ``batch`` activation rows,
    in our decoder's layout (``FusedDecoder``: fused QKV and w1/w3, oneDNN-prepacked on the CPU)
    and dtypes (under bf16 autocast: bf16 blocks, fp32 head), the decoder ``generate`` uses now.

    At batch 1 this is a memory-bandwidth bound (all weights are read once per step); at batch 16
    on a CPU it is close to the matmul peak. ``HF time / this`` is the largest speed-up over HF
    that our decoder could reach if everything but its matmuls were free.
    """
    decoder = fused_decoder(model)
    dim = model.config.dim
    matmuls = [(dim, decoder.output)]  # (input width, weight)
    for wqkv, wo, w13, w2 in decoder.layers:
        matmuls += [(dim, wqkv), (decoder.q_size, wo), (dim, w13), (decoder.hidden_dim, w2)]
    inputs = [(torch.randn(batch, width, device=device, dtype=weight.dtype), weight) for width, weight in matmuls]

    def run():
        with torch.inference_mode():
            for x, weight in inputs:
                decoder._linear(x, weight)
    return run


def bench_own_path(model, batch: int, new_tokens: int, rounds: int, device: torch.device,
                   clock=time.perf_counter, dtype: str = "float32") -> list[str]:
    """Greedy ``generate`` through ``FusedDecoder`` (where ``FusedDecoder.supports``) against the
    model's own modules (``fused=False``), in ``dtype``'s precision."""
    prompts = make_prompts(batch, model.config.vocab_size, seed=batch)
    context = lambda: precision(dtype, device)  # noqa: E731

    def run(fused: bool):
        return within(context, lambda: generate(model, prompts, max_new_tokens=new_tokens, temperature=0.0,
                                                eos_id=None, fused=fused))

    with context():
        fused_used = FusedDecoder.supports(model)
    fused_out, modules_out = run(True)(), run(False)()
    same = (fused_out.response_ids == modules_out.response_ids).float().mean().item()
    seconds = interleaved_medians({"fused": synchronized(run(True), device),
                                   "modules": synchronized(run(False), device)}, rounds, clock=clock)
    tps = {name: batch * new_tokens / s for name, s in seconds.items()}
    return [model.config.name, dtype, str(batch), f"{tps['fused']:.0f}", f"{tps['modules']:.0f}",
            f"{seconds['modules'] / seconds['fused']:.2f}x", f"{same:.3f}", "yes" if fused_used else "no"]


def eos_prone(model: Transformer, eos_id: int, eos_logit: float) -> Transformer:
    """The model with a constant feature in every embedding that only the EOS logit reads, so EOS
    has a roughly constant probability per step and sampled rows stop at scattered steps."""
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] = 1.0
        feature = model.hidden_states(torch.tensor([[1, 2, 3, 4]], device=model.output.weight.device))[0, :, 0].mean()
        model.output.weight[eos_id] = 0.0
        model.output.weight[eos_id, 0] = eos_logit / feature
    return model


def bench_ragged(size: str, batch: int, new_tokens: int, rounds: int, device: torch.device,
                 clock=time.perf_counter) -> list[str]:
    torch.manual_seed(0)
    model = eos_prone(Transformer(ModelConfig.from_name(size)).to(device).eval(), eos_id=2, eos_logit=4.0)
    prompts = make_prompts(batch, model.config.vocab_size, seed=batch)

    def run(drop: bool):
        return lambda: generate(model, prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, eos_id=2,
                                generator=0, drop_finished=drop)

    out = run(True)()
    lengths = out.response_lengths.float()
    seconds = interleaved_medians({"keep": synchronized(run(False), device), "drop": synchronized(run(True), device)},
                                  rounds, clock=clock)
    useful = lengths.sum().item()
    return [size, str(batch), f"{lengths.mean():.0f} / {lengths.max():.0f}", f"{useful / seconds['keep']:.0f}",
            f"{useful / seconds['drop']:.0f}", f"{seconds['keep'] / seconds['drop']:.2f}x"]


# ------------------------------------------------------------------------------------- profile
class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_per_decode_step(run, steps: tuple[int, int] = (9, 17)) -> collections.Counter:
    """Operators of one decode step: the difference between two runs, divided by the extra steps."""
    counts = []
    for n in steps:
        with CountOps() as counter:
            run(n)
        counts.append(counter.counts)
    extra = steps[1] - steps[0]
    return collections.Counter({k: (counts[1][k] - counts[0][k]) / extra for k in counts[1]
                                if counts[1][k] != counts[0][k]})


def profile(size: str, batch: int, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, hf = build(size, device)
    prompts = make_prompts(batch, model.config.vocab_size, seed=batch)
    ids, mask = left_pad(prompts, device)

    def ours(n: int):
        generate(model, prompts, max_new_tokens=n, temperature=0.7, top_p=1.0, eos_id=None, generator=0)

    def theirs(n: int):
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
                        use_cache=True, do_sample=True, temperature=0.7, top_p=1.0, top_k=0)

    # Decode-step time from the difference of two lengths (prefill cancels), best of a few runs;
    # against the time of the step's matmuls alone, which every implementation must pay.
    def step_time(run) -> float:
        best = {}
        for n in (33, 97):
            best[n] = min(timed(lambda: run(n)) for _ in range(3))
        return (best[97] - best[33]) / 64

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    ours_matmuls = weight_matmuls(model, batch, device)

    def matmuls(n: int):
        for _ in range(n):
            ours_matmuls()

    ours(2), theirs(2)
    ours_step, hf_step, matmul_step = step_time(ours), step_time(theirs), step_time(matmuls)
    print(f"\n[{size}, batch {batch}] one decode step (sampling): ours {ours_step * 1e6:.0f} us, "
          f"HF {hf_step * 1e6:.0f} us; our decoder's matmuls alone {matmul_step * 1e6:.0f} us, so with these matmuls"
          f" no implementation beats HF by more than {hf_step / matmul_step:.1f}x")
    print(f"[{size}, batch {batch}] aten operators per decode step (sampling):")
    for name, run in (("ours", ours), ("HF", theirs)):
        run(2)
        per_step = ops_per_decode_step(run)
        top = ", ".join(f"{k} {v:g}" for k, v in per_step.most_common(14))
        print(f"  {name:<4} {sum(per_step.values()):5.0f}  ({top}, ...)")

    with torch.inference_mode():
        decoder = FusedDecoder(model)  # generate's decoder for this model (see llama2_lit.decoding)
        cache = KVCache(model.config, batch, ids.shape[1] + 64, device=device)
        decoder.prefill(ids, cache, mask)
        tokens, uniforms = ids[:, -1], torch.rand(batch, device=device)

        def step():
            return sample_next_token(decoder.step(tokens, cache), temperature=0.7, top_p=1.0, uniforms=uniforms)

        step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(32):
                step()
    print("  where 32 of our decode steps spend their time (self time; profiler overhead included):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["micro", "mini"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--modes", nargs="+", choices=["greedy", "sample"], default=["greedy", "sample"])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "bf16-mixed"],
                        default=["float32", "bfloat16"],
                        help="weights and KV cache of both sides; bf16-mixed: fp32 ones under bf16 autocast")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed runs per contender")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (use with --threads 1 on a shared machine)")
    parser.add_argument("--no-ragged", action="store_true", help="skip the ragged-batch table")
    parser.add_argument("--no-own-path", action="store_true",
                        help="skip the table of FusedDecoder against the model's own modules")
    parser.add_argument("--profile", action="store_true", help="count operators per decode step and profile ours")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (torch.get_num_threads() != 1 or args.device != "cpu"):
        parser.error("--clock cpu needs --threads 1 and --device cpu (CPU time sums the threads, idle OpenMP "
                     "threads spin, and an accelerator's time is not the process's)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{environment_line()}, device {device}, load average {load}")
    print(f"{args.new_tokens} new tokens per row, EOS disabled on both sides; tokens/s = batch * new tokens / "
          f"median {'CPU' if args.clock == 'cpu' else 'wall'} time of {args.rounds} interleaved runs "
          "(prefill included)\n")
    rows, own_rows = [], []
    for size in args.sizes:
        model, hf = build(size, device)
        for dtype in args.dtypes:
            pair = (model, hf) if dtype in ("float32", "bf16-mixed") else \
                (copy.deepcopy(model).to(getattr(torch, dtype)), copy.deepcopy(hf).to(getattr(torch, dtype)))
            for batch in args.batches:
                for mode in args.modes:
                    rows.append(bench_vs_hf(*pair, batch, mode, args.new_tokens, args.rounds, device, clock, dtype))
                    print(f"  done: {' '.join(rows[-1])}", file=sys.stderr, flush=True)
                if not args.no_own_path:
                    own_rows.append(bench_own_path(pair[0], batch, args.new_tokens, args.rounds, device, clock, dtype))
                    print(f"  done: {' '.join(own_rows[-1])}", file=sys.stderr, flush=True)
    print_table(["size", "weights", "batch", "mode", "ours tok/s", "HF tok/s", "ours/HF", "ceiling", "same tokens"],
                rows)
    print(f"ceiling: HF's time over the time of the weight matmuls alone ({args.new_tokens} steps of every weight "
          "matrix times the batch's rows, in the dtypes, fused and prepacked layout of the decoder generate uses) -- "
          "the largest ours/HF our decoder could reach if all but its matmuls were free")

    if own_rows:
        print("\nOurs through FusedDecoder against the model's own modules (generate(..., fused=False)), greedy")
        print_table(["size", "weights", "batch", "fused tok/s", "modules tok/s", "fused speed-up", "same tokens",
                     "fused used"], own_rows)

    if not args.no_ragged:
        print(f"\nRagged batches (sampled, EOS at scattered steps, at most {args.new_tokens} tokens): "
              "finished rows kept in the batch vs dropped from it; tok/s counts generated tokens")
        rows = [bench_ragged(size, 16, args.new_tokens, args.rounds, device, clock) for size in args.sizes]
        print_table(["size", "batch", "mean / max length", "keep tok/s", "drop tok/s", "drop speed-up"], rows)

    if args.profile:
        for size in args.sizes:
            for batch in args.batches:
                profile(size, batch, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
