"""Generation under FSDP2: the naive sharded path against the consolidated copy (paper section 3.2.3).

The paper found generation under FSDP "≈20× slower" and fixed it by consolidating the weights
once before generation and freeing them afterwards. This times both on the same sharded model:

* **naive**: ``llama2_lit.rollout.ShardedRollout``, generating from the FSDP2 module itself (every
  decode step all-gathers every block, the heads and the embeddings);
* **consolidated**: ``ConsolidatedRollout``, ``sync_weights`` (one all-gather per FSDP unit into an
  unsharded copy) + ``generate`` on the copy + ``release``, all three inside the timing.

Greedy, exactly ``--new-tokens`` tokens per row (no EOS), the same left-padded prompts on every
rank; both paths must produce the same tokens (checked). Runs are interleaved (naive,
consolidated, naive, ...) and medians reported, because the machine may be shared.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/rollout.py
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/rollout.py --sizes micro --batch 16

On CPU this runs on gloo with ``--threads`` threads per process (default 1); with NCCL on GPUs
(``--device cuda``, one GPU per process) the per-step all-gathers cross NVLink or the network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, print_table  # noqa: E402

from llama2_lit.config import ModelConfig  # noqa: E402
from llama2_lit.model import Transformer  # noqa: E402
from llama2_lit.parallelize import apply_fsdp  # noqa: E402
from llama2_lit.rollout import ConsolidatedRollout, ShardedRollout  # noqa: E402

SIZES = {
    "nano": ModelConfig.from_name("nano"),
    "small": ModelConfig(name="small", dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096,
                         multiple_of=32, max_seq_len=256),
    "micro": ModelConfig.from_name("micro"),
}


def make_prompts(batch: int, vocab_size: int, seed: int) -> list[list[int]]:
    """BOS + 4..19 random tokens (ragged, so the batch is left-padded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 20, (batch,), generator=g).tolist()
    return [[1] + torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def barrier_timed(run) -> float:
    dist.barrier()
    start = time.perf_counter()
    run()
    dist.barrier()  # both ranks done: the slower one counts
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(args.device, (world,))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        policy = Transformer(SIZES[size]).to(device).eval()
        apply_fsdp(policy, mesh)
        prompts = make_prompts(args.batch, policy.config.vocab_size, seed=0)
        options = dict(max_new_tokens=args.new_tokens, temperature=0.0, eos_id=None)
        naive, engine = ShardedRollout(), ConsolidatedRollout()
        outputs: dict[str, torch.Tensor] = {}
        parts: dict[str, list[float]] = {"sync": [], "generate": []}

        def run_naive() -> None:
            with naive.rollout(policy):
                outputs["naive"] = naive.generate(prompts, **options).response_ids

        def run_consolidated() -> None:
            start = time.perf_counter()
            engine.sync_weights(policy)
            synced = time.perf_counter()
            outputs["consolidated"] = engine.generate(prompts, **options).response_ids
            parts["sync"].append(synced - start)
            parts["generate"].append(time.perf_counter() - synced)
            engine.release()

        run_naive(), run_consolidated()  # warm-up (FSDP's lazy init, thread pools)
        parts = {"sync": [], "generate": []}
        times: dict[str, list[float]] = {"naive": [], "consolidated": []}
        for _ in range(args.rounds):
            times["naive"].append(barrier_timed(run_naive))
            times["consolidated"].append(barrier_timed(run_consolidated))
        same = torch.equal(outputs["naive"], outputs["consolidated"])
        naive_s, consolidated_s = (statistics.median(times[k]) for k in ("naive", "consolidated"))
        rows.append([size, f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M", str(args.batch),
                     str(args.new_tokens), f"{naive_s * 1e3:.0f}", f"{statistics.median(parts['sync']) * 1e3:.1f}",
                     f"{statistics.median(parts['generate']) * 1e3:.0f}", f"{consolidated_s * 1e3:.0f}",
                     f"{naive_s / consolidated_s:.1f}x", "yes" if same else "NO"])
        del policy
    if rank == 0:
        print(f"torch {torch.__version__}, git {git_commit()}, {world} ranks on {args.device} "
              f"({'gloo' if args.device == 'cpu' else 'nccl'}), {args.threads} thread(s) per rank, "
              f"medians of {args.rounds} interleaved rounds, greedy")
        print_table(["size", "params", "batch", "tokens", "naive ms", "sync ms", "generate ms",
                     "consolidated ms", "naive/consolidated", "same tokens"], rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
