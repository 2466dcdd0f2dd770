"""Reward-model training speed: our ``RewardModule`` step against TRL's ``RewardTrainer`` step.

Same tiny Llama (a preset, random weights, exported to Hugging Face with
``llama2_lit.checkpoints.export_hf`` and loaded as ``LlamaForSequenceClassification``, so both
start from the same weights), the same toy-world preference pairs encoded once in the chat
format, the same batches (chosen and rejected right-padded together to the batch's longest
sequence on both sides), the same AdamW (betas 0.9/0.95, eps 1e-5, weight decay 0.1, lr 1e-5),
fp32, in one process.

One step = collate the pairs, score chosen and rejected in one forward pass, the ranking loss
(ours with the "small" margin of Table 27; TRL's with the same margins passed as its ``margin``
column), backward, optimizer step. Ours is ``RewardModule.pair_scores`` + ``losses``; TRL's is
``RewardTrainer.training_step`` (its ``compute_loss`` and the accelerator's backward). Neither
clips gradients here (TRL clips in its outer loop, as Lightning does). Steps are timed
interleaved (ours, TRL, ours, TRL, ...) and summarised by medians, so load from other processes
hits both alike; pairs/s = batch size / median step time. This is a benchmark, not a test.

    python benchmarks/reward_model.py                       # micro, batch 16, 20 rounds
    python benchmarks/reward_model.py --size nano --batch-size 8 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, environment_line, print_table  # noqa: E402

from llama2_lit.checkpoints import export_hf  # noqa: E402
from llama2_lit.config import ModelConfig  # noqa: E402
from llama2_lit.data.datamodules import PAD_TOKEN, PreferenceCollate, PreferenceDataModule  # noqa: E402
from llama2_lit.data.records import load_records  # noqa: E402
from llama2_lit.model import Transformer  # noqa: E402
from llama2_lit.rlhf.ranking import rating_margins  # noqa: E402
from llama2_lit.stages import RewardModule  # noqa: E402
from llama2_lit.stages.toy_world import TOKENIZER_PATH, WORLD_DIR, ensure_toy_assets  # noqa: E402

ADAMW = {"lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-5, "weight_decay": 0.1}


def toy_pairs(n: int, max_seq_len: int) -> list[dict]:
    """The first ``n`` helpfulness pairs of the toy world, encoded as the reward stage encodes them."""
    path = str(REPO_ROOT / WORLD_DIR / "preference_helpful_train.jsonl")
    data = PreferenceDataModule(str(REPO_ROOT / TOKENIZER_PATH), [path], max_seq_len=max_seq_len)
    return [data.encode(record) for record in load_records(path, "preference")[:n]]


def ours(model: Transformer, batches: list[list[dict]]):
    module = RewardModule(preset=None, init_from="unused", margin="small")
    module.model = model
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    collate = PreferenceCollate()

    def step(examples: list[dict]) -> float:
        batch = collate(examples)
        r_chosen, r_rejected = module.pair_scores(batch)
        loss = module.losses(batch, r_chosen, r_rejected)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def trl(folder: Path, batches: list[list[dict]], batch_size: int, scratch: Path):
    import datasets
    import transformers
    from trl import RewardConfig, RewardTrainer

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                            attn_implementation="sdpa")
    model.config.pad_token_id = PAD_TOKEN  # the last real token is found by the pad id
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token_id = PAD_TOKEN
    flat = [e for batch in batches for e in batch]
    margins = rating_margins(torch.tensor([e["rating"] for e in flat]), "small").tolist()
    dataset = datasets.Dataset.from_dict({"chosen_ids": [e["chosen"] for e in flat],
                                          "rejected_ids": [e["rejected"] for e in flat], "margin": margins})
    args = RewardConfig(output_dir=str(scratch), per_device_train_batch_size=batch_size, max_length=None,
                        report_to=[], use_cpu=True, learning_rate=ADAMW["lr"], adam_beta1=0.9, adam_beta2=0.95,
                        adam_epsilon=ADAMW["eps"], weight_decay=ADAMW["weight_decay"], logging_steps=10**9,
                        save_strategy="no", disable_dropout=True, dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.create_optimizer()
    optimizer = trainer.optimizer
    # Set by Trainer's own loop before each step (transformers 5); one optimizer step per batch here.
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    margin_of = {id(e): m for e, m in zip(flat, margins)}

    def step(examples: list[dict]) -> float:
        batch = trainer.data_collator([{"chosen_ids": e["chosen"], "rejected_ids": e["rejected"],
                                        "margin": margin_of[id(e)]} for e in examples])
        loss = trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="micro")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per contender (interleaved)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_toy_assets(REPO_ROOT)
    print(f"reward-model benchmark: {environment_line()}")
    torch.manual_seed(0)
    config = ModelConfig.from_name(args.size, max_seq_len=args.max_seq_len)
    model = Transformer(config, lm_head=False, scalar_head=True)
    n_batches = args.rounds + 2
    pairs = toy_pairs(n_batches * args.batch_size, args.max_seq_len)
    batches = [pairs[i * args.batch_size:(i + 1) * args.batch_size] for i in range(n_batches)]
    with tempfile.TemporaryDirectory() as scratch:
        folder = export_hf(model, config, Path(scratch) / "hf", tokenizer_path=REPO_ROOT / TOKENIZER_PATH)
        contenders = {"llama2_lit": ours(model, batches),
                      "trl": trl(folder, batches, args.batch_size, Path(scratch) / "trl")}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        losses: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(n_batches):
            for name, step in contenders.items():
                start = time.perf_counter()
                losses[name].append(step(batches[round_]))
                if round_ >= 2:  # the first steps carry one-off costs (allocations, thread pools)
                    times[name].append(time.perf_counter() - start)
    tokens = statistics.mean(2 * len(b) * max(max(len(e["chosen"]), len(e["rejected"])) for e in b) for b in batches)
    rows, rate = [], {}
    for name in contenders:
        median = statistics.median(times[name])
        rate[name] = args.batch_size / median
        rows.append([name, f"{rate[name]:,.1f}", f"{median * 1e3:,.1f}", f"{losses[name][0]:.4f}",
                     f"{losses[name][-1]:.4f}"])
    print(f"{args.size} ({config.num_parameters(lm_head=False):,} parameters + head), {args.batch_size} pairs per step, "
          f"~{tokens:,.0f} padded tokens per step, {args.rounds} timed steps each")
    print_table(["contender", "pairs/s", "step ms", "first loss", "last loss"], rows)
    print(f"ratio llama2_lit / trl pairs/s: {rate['llama2_lit'] / rate['trl']:.2f}")


if __name__ == "__main__":
    main()
