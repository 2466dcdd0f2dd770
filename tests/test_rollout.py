"""Rollout engines (``llama2_lit.rollout``): generation under FSDP2 without the all-gather per token.

The 2-process test shards a small model over 2 CPU ranks (gloo, ``fully_shard`` through
``llama2_lit.parallelize.apply_fsdp``), launched with torchrun in a subprocess with a timeout.
Every rank also keeps an unsharded copy of the same initial weights as the reference. Greedy
tokens through the consolidated copy must equal the reference's and the naive sharded path's,
token for token; sampled tokens too; each rank then generates its own prompts through the copy
(no lockstep), the copy is freed by ``release``, a bf16 mixed-precision policy with activation
checkpointing gets a bf16 copy, a training step changes the shards and the next sync picks the
new weights up. The timings of both paths are printed (``pytest -s``); the test
only asserts that the engine is not slower than the naive path.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from llama2_lit.config import ModelConfig
from llama2_lit.generation import generate
from llama2_lit.model import Transformer
from llama2_lit.rollout import ConsolidatedRollout, ShardedRollout

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180

# Between nano and micro: big enough that moving the weights costs more than a decode step's compute.
SHAPE = dict(name="rollout-test", dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096,
             multiple_of=32, max_seq_len=256)
BATCH, NEW_TOKENS = 8, 48


def make_prompts(vocab_size: int, batch: int, seed: int) -> list[list[int]]:
    """Ragged prompts (left padding at generation), BOS first."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (batch,), generator=generator).tolist()
    return [[1] + torch.randint(3, vocab_size, (n - 1,), generator=generator).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------- 1 process
def test_unsharded_policy_generates_from_itself_with_no_copy():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SHAPE, "n_layers": 2, "dim": 64})).eval()
    prompts = make_prompts(model.config.vocab_size, 4, seed=1)
    sampling = dict(max_new_tokens=8, temperature=0.7, top_p=1.0, eos_id=None, generator=[1, 2, 3, 4])
    expected = generate(model, prompts, **sampling)

    engine = ConsolidatedRollout(dtype=torch.bfloat16)  # dtype applies to a copy; an unsharded policy has none
    with pytest.raises(RuntimeError, match="sync_weights"):
        engine.generate(prompts, max_new_tokens=8, eos_id=None)
    with engine.rollout(model):
        assert engine.model is model and not engine.holds_copy
        out = engine.generate(prompts, **sampling)
    assert out.response_ids.tolist() == expected.response_ids.tolist()
    torch.testing.assert_close(out.logprobs, expected.logprobs, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="sync_weights"):  # released: holds no weights
        engine.model  # noqa: B018

    with pytest.raises(ValueError, match="empty"), engine.rollout(model):  # released on errors too
        engine.generate([[]], max_new_tokens=8, eos_id=None)
    with pytest.raises(RuntimeError, match="sync_weights"):
        engine.model  # noqa: B018

    naive = ShardedRollout()  # on an unsharded model, the naive path is plain generation too
    with naive.rollout(model):
        again = naive.generate(prompts, **sampling)
    assert again.response_ids.tolist() == expected.response_ids.tolist()


# ---------------------------------------------------------------------------------------- 2 processes
def test_fsdp2_consolidated_rollout_matches_unsharded_and_beats_naive_sharded_generation(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    for rank, out in enumerate(ranks):
        # Greedy, same prompts on every rank: the three paths agree token for token.
        assert out["consolidated"] == out["reference"], f"rank {rank}"
        assert out["naive"] == out["reference"], f"rank {rank}"
        assert out["sampled"] == out["sampled_reference"], f"rank {rank}"
        # Each rank's own prompts, stopping at EOS: no lockstep between ranks, same tokens as alone.
        assert out["own_prompts"] == out["own_prompts_reference"], f"rank {rank}"
        assert out["copy_is_exact"] and out["bf16_copy_is_exact"] and out["bf16_dtype"] == "torch.bfloat16"
        assert out["mixed_dtype"] == "torch.bfloat16" and out["mixed"] == out["mixed_reference"], f"rank {rank}"
        assert out["storage_reused"], "a second sync without release must copy into the same storage"
        assert out["copy_freed"], "release() must free the copy's parameters"
        assert out["after_step_is_exact"] and out["after_step"] == out["after_step_reference"], f"rank {rank}"
        assert out["trained_loss_matches"], f"rank {rank}"
    assert ranks[0]["own_prompts"] != ranks[1]["own_prompts"]  # the ranks really generated different prompts

    t = ranks[0]["seconds"]
    engine = t["sync"] + t["generate"] + t["release"]
    print(f"\n[rollout] {ranks[0]['parameters'] / 1e6:.2f}M parameters over 2 CPU ranks (gloo), batch {BATCH}, "
          f"{NEW_TOKENS} new tokens, greedy: naive sharded {t['naive'] * 1e3:.0f} ms; consolidated "
          f"sync {t['sync'] * 1e3:.1f} + generate {t['generate'] * 1e3:.0f} + release {t['release'] * 1e3:.2f} ms "
          f"= {engine * 1e3:.0f} ms; naive / consolidated = {t['naive'] / engine:.1f}x (best of {t['repeats']})")
    assert engine < t["naive"], "the consolidated path must not be slower than generating from the shards"


# ---------------------------------------------------------------------------------------- the worker
def _worker(out_dir: Path) -> None:
    """One rank of the 2-process test (run by torchrun)."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llama2_lit.parallelize import apply_activation_checkpointing, apply_fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # the same initial weights on every rank
    reference = Transformer(ModelConfig(**SHAPE)).eval()
    policy = copy.deepcopy(reference)
    apply_fsdp(policy, mesh)
    vocab = reference.config.vocab_size
    prompts = make_prompts(vocab, BATCH, seed=7)
    greedy = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=None)
    short = {**greedy, "max_new_tokens": 16}  # for the checks that are not timed
    result: dict = {"parameters": sum(p.numel() for p in reference.parameters())}

    def tokens(out):
        return out.response_ids.tolist()

    def copy_equals(engine, model, dtype=None, atol=0.0):
        copied = engine.model.state_dict()
        return sorted(copied) == sorted(model.state_dict()) and all(
            torch.allclose(copied[name], tensor if dtype is None else tensor.to(dtype), rtol=0, atol=atol)
            for name, tensor in model.state_dict().items())

    result["reference"] = tokens(generate(reference, prompts, **greedy))

    # Timings: best of a few repeats (the CPU is shared with other work).
    repeats, seconds = 2, {"naive": float("inf"), "sync": float("inf"), "generate": float("inf"),
                           "release": float("inf")}
    naive, engine = ShardedRollout(), ConsolidatedRollout()
    for repeat in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        with naive.rollout(policy):
            result["naive"] = tokens(naive.generate(prompts, **greedy))
        seconds["naive"] = min(seconds["naive"], time.perf_counter() - start)

        dist.barrier()
        start = time.perf_counter()
        engine.sync_weights(policy)
        synced = time.perf_counter()
        result["consolidated"] = tokens(engine.generate(prompts, **greedy))
        generated = time.perf_counter()
        if repeat == 0:
            result["copy_is_exact"] = copy_equals(engine, reference)
            first_copy = weakref.ref(engine.model.layers[0].attention.wq.weight)
        engine.release()
        released = time.perf_counter()
        for name, value in (("sync", synced - start), ("generate", generated - synced),
                            ("release", released - generated)):
            seconds[name] = min(seconds[name], value)
    gc.collect()
    result["copy_freed"] = first_copy() is None and not engine.holds_copy
    result["seconds"] = {**seconds, "repeats": repeats}

    # Sampling: per-row seeds, the same numbers from the copy as from the reference.
    sampling = dict(max_new_tokens=16, temperature=0.8, top_p=1.0, eos_id=None, generator=list(range(BATCH)))
    result["sampled_reference"] = tokens(generate(reference, prompts, **sampling))
    with engine.rollout(policy):
        result["sampled"] = tokens(engine.generate(prompts, **sampling))
        # Each rank its own prompts and its own number of decode steps: a collective inside
        # decoding (the sharded path's all-gathers) would hang here until the timeout.
        own = dict(max_new_tokens=24 if rank == 0 else 10, temperature=0.0, eos_id=result["reference"][0][3])
        own_prompts = make_prompts(vocab, 4, seed=100 + rank)
        result["own_prompts"] = tokens(engine.generate(own_prompts, **own))
        result["own_prompts_reference"] = tokens(generate(reference, own_prompts, **own))

    bf16 = ConsolidatedRollout(dtype=torch.bfloat16)
    with bf16.rollout(policy):
        result["bf16_dtype"] = str(next(bf16.model.parameters()).dtype)
        result["bf16_copy_is_exact"] = copy_equals(bf16, reference, torch.bfloat16)
        bf16.generate(prompts, **short)  # runs (tokens may differ from fp32's)

    # Mixed precision (bf16 compute, fp32 master shards) and activation checkpointing, as the
    # GPU strategy ``fsdp2_bf16`` shards: by default the copy takes FSDP's compute dtype, and
    # computes what the bf16 reference computes.
    mixed = copy.deepcopy(reference)
    apply_activation_checkpointing(mixed)
    apply_fsdp(mixed, mesh, param_dtype=torch.bfloat16)
    with ConsolidatedRollout().rollout(mixed) as mixed_engine:
        result["mixed_dtype"] = str(next(mixed_engine.model.parameters()).dtype)
        result["mixed"] = tokens(mixed_engine.generate(prompts, **short))
    result["mixed_reference"] = tokens(generate(copy.deepcopy(reference).to(torch.bfloat16), prompts,
                                                **short))

    # Training resumes on the shards after both paths; the next sync sees the new weights and
    # copies them into the copy the engine still holds.
    engine.sync_weights(policy)
    storage = engine.model.output.weight.data_ptr()
    batch = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (policy, reference):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()  # FSDP averages the two ranks' (identical) gradients: the reference's gradient
        optimizer.step()
        losses.append(loss.item())
        model.eval()
    result["trained_loss_matches"] = abs(losses[0] - losses[1]) < 1e-5
    engine.sync_weights(policy)
    result["storage_reused"] = engine.model.output.weight.data_ptr() == storage
    result["after_step_is_exact"] = copy_equals(engine, reference, atol=1e-6)
    result["after_step"] = tokens(engine.generate(prompts, **short))
    result["after_step_reference"] = tokens(generate(reference, prompts, **short))
    engine.release()

    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
