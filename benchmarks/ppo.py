"""One PPO iteration (rollout, scoring, update): our ``PPOModule`` under Lightning against TRL's ``PPOTrainer``.

Ours runs as the product runs: ``configs/<size>/ppo.yaml`` through the stage CLI (``StageCLI``, the
code behind ``llama2-lit fit``), a real ``Trainer.fit`` of ``PPOModule`` with its run directory
and CSV log, one training batch = one PPO iteration (paper section 3.2.3). TRL's iterations run
in a Lightning callback *between* ours (ours, TRL, ours, TRL, ...), each one
``PPOTrainer.train()`` on **the very prompts ours has just used** (trl 1.12.0, the last release
with a PPO trainer: ``trl.experimental.ppo``). Medians over the timed rounds, the first round
dropped (one-off costs: thread pools, allocations, the throughput meter's peak measurement).

Both sides start from the same weights: a random policy (also the reference) and random reward
models of the preset's shape, saved in our format and exported to Hugging Face with
``llama2_lit.checkpoints.export_hf`` (the tokenizer with ``write_hf_tokenizer``); TRL loads the
policy and reference as ``LlamaForCausalLM``, the value and reward models as
``LlamaForSequenceClassification``. Set equal on both sides: the batch (16 prompts), one sampled
response each of at most 32 tokens stopping at EOS (random weights rarely emit it, so responses
run to the limit on both sides; the table shows the mean lengths), pure sampling at temperature
1, one PPO epoch of 4 mini-batches with one optimizer step each, KL coefficient 0.01 (k1), clip
0.2 for ratio and value, value-loss weight 0.1, GAE γ = 1 and λ = 0.95, a missing-EOS penalty of
1, AdamW (0.9, 0.95, eps 1e-5, weight decay 0.1) at a constant lr 1e-5, fp32, no activation
checkpointing (TRL's default is on), the same threads.

What still differs (each side's own design):

* ours scores with **two** reward models (helpfulness and safety, R_c of Eq. 4 needs both); TRL
  with one;
* ours recomputes the rollout's log-probs (and entropy) with a policy forward pass after
  sampling, so the first mini-batch's ratio is exactly 1; TRL takes them from ``generate``'s
  per-step logits;
* ours clips the gradient norm at 1.0 (the paper); TRL's PPO loop does not clip;
* ours judges the training rollouts with the toy world's oracle (the logged oracle helpfulness);
* generation: ours ``llama2_lit.generation.generate`` (KV cache, finished rows dropped) through
  the rollout engine; TRL Hugging Face ``generate`` (``DynamicCache``).

Generation share = seconds spent generating / seconds of the iteration (ours: the logged
``perf/generation_seconds``; TRL: its ``batch_generation`` call, timed by wrapping it). Besides
wall seconds the table gives the process's CPU seconds per iteration (``time.process_time``): on a
machine shared with other work, wall time includes waiting for a core, CPU time does not (with
``--threads 1`` it is the work done). This is a benchmark, not a test.

    python benchmarks/ppo.py                         # micro (dim 256, 6 layers), 6 timed rounds
    python benchmarks/ppo.py --size nano --rounds 4
    python benchmarks/ppo.py --threads 1             # on a machine shared with other work
    python benchmarks/ppo.py --precision bf16        # both sides under bf16 autocast (CPUs with bf16 units)

On a CPU that other processes keep busy, several threads per process wait on each other at every
small kernel, and a decode loop of small kernels suffers most: there, ``--threads 1`` measures the
work instead of the contention.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, environment_line, print_table  # noqa: E402

from llama2_lit.checkpoints import export_hf, save_model  # noqa: E402
from llama2_lit.config import ModelConfig  # noqa: E402
from llama2_lit.data.datamodules.common import PAD_TOKEN  # noqa: E402
from llama2_lit.model import Transformer  # noqa: E402
from llama2_lit.stages.cli import StageCLI  # noqa: E402
from llama2_lit.stages.toy_world import TOKENIZER_PATH, ensure_toy_assets  # noqa: E402

# The settings both sides share (see the module docstring).
KL_COEF, CLIP, VALUE_COEF, GAMMA, LAM, MISSING_EOS_PENALTY, TEMPERATURE, LR = 0.01, 0.2, 0.1, 1.0, 0.95, 1.0, 1.0, 1e-5


def make_models(size: str, root: Path) -> dict[str, Path]:
    """Random policy and reward models of the preset's shape, ours (``save_model``) and HF (``export_hf``)."""
    config = ModelConfig.from_name(size)
    tokenizer = REPO_ROOT / TOKENIZER_PATH
    paths = {}
    for name, seed, heads in (("policy", 0, {}), ("rm_help", 1, {"lm_head": False, "scalar_head": True}),
                              ("rm_safe", 2, {"lm_head": False, "scalar_head": True})):
        torch.manual_seed(seed)
        model = Transformer(config, **heads)
        paths[name] = save_model(model, config, root / name, tokenizer_path=tokenizer)
        if name != "rm_safe":  # TRL scores with one reward model
            paths[f"{name}_hf"] = export_hf(model, config, root / f"{name}_hf", tokenizer_path=tokenizer)
    return paths


class TRLSide:
    """TRL's ``PPOTrainer`` with our settings; ``iteration(prompt_ids)`` runs one PPO iteration on them."""

    def __init__(self, paths: dict[str, Path], *, batch_size: int, mini_batches: int, response_length: int,
                 bf16: bool, scratch: Path) -> None:
        import datasets
        import transformers
        import trl.experimental.ppo.ppo_trainer as ppo_trainer
        from transformers.trainer_callback import PrinterCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        transformers.logging.set_verbosity_error()
        load_lm = transformers.AutoModelForCausalLM.from_pretrained
        load_score = transformers.AutoModelForSequenceClassification.from_pretrained
        policy, reference = (load_lm(paths["policy_hf"], attn_implementation="sdpa") for _ in range(2))
        value, reward = (load_score(paths["rm_help_hf"], num_labels=1, attn_implementation="sdpa") for _ in range(2))
        tokenizer = transformers.AutoTokenizer.from_pretrained(paths["policy_hf"])
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(PAD_TOKEN)  # TRL finds padding by this id
        for model in (policy, reference, value, reward):
            model.config.pad_token_id = PAD_TOKEN
        policy.generation_config.pad_token_id = PAD_TOKEN
        self.eos_id = tokenizer.eos_token_id
        args = PPOConfig(
            output_dir=str(scratch), report_to=[], use_cpu=True, bf16=bf16, gradient_checkpointing=False,
            disable_tqdm=True, save_strategy="no", logging_steps=10**9, seed=0, dataloader_num_workers=0,
            # One iteration per train() call: a batch of `batch_size` prompts, one response each.
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, total_episodes=batch_size,
            local_rollout_forward_batch_size=batch_size, num_mini_batches=mini_batches, num_ppo_epochs=1,
            response_length=response_length, stop_token="eos", temperature=TEMPERATURE,
            missing_eos_penalty=MISSING_EOS_PENALTY, kl_coef=KL_COEF, kl_estimator="k1", whiten_rewards=False,
            cliprange=CLIP, cliprange_value=CLIP, vf_coef=VALUE_COEF, gamma=GAMMA, lam=LAM,
            num_sample_generations=0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, weight_decay=0.1,
        )
        # A placeholder dataset (the trainer wants one); every iteration replaces the data loader.
        placeholder = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * batch_size})
        self.trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                                  reward_model=reward, value_model=value, train_dataset=placeholder)
        self.trainer.remove_callback(PrinterCallback)
        # Timing only: the rollout's generation is one call of the module's `batch_generation`.
        self.generation_seconds, self.last_generation = 0.0, None
        original = ppo_trainer.batch_generation

        def timed_batch_generation(*args: Any, **kwargs: Any):
            began = time.perf_counter()
            out = original(*args, **kwargs)
            self.generation_seconds += time.perf_counter() - began
            self.last_generation = out[0]
            return out
        ppo_trainer.batch_generation = timed_batch_generation

    def iteration(self, prompt_ids: torch.Tensor) -> dict[str, float]:
        """One PPO iteration on these left-padded prompts (pad = ``PAD_TOKEN``)."""
        self.trainer.dataloader = [{"input_ids": prompt_ids}]
        self.generation_seconds = 0.0
        began, cpu_began = time.perf_counter(), time.process_time()
        self.trainer.train()
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
        responses = self.last_generation[:, prompt_ids.shape[1]:]
        is_eos = responses == self.eos_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.shape[1])
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "generation_seconds": self.generation_seconds,
                "response_length": float(lengths.float().mean())}


class InterleavedTRL(Callback):
    """Times each of our training batches (= PPO iterations), then runs TRL's on the same prompts.

    Ours is timed from the end of the previous TRL iteration (or the start of training) to the end
    of our batch: the data loader, every hook and callback, the rollout and the update.
    """

    def __init__(self, trl: TRLSide) -> None:
        self.trl = trl
        self.ours: list[dict[str, float]] = []
        self.theirs: list[dict[str, float]] = []
        self._began = self._cpu_began = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._began, self._cpu_began = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds, cpu_seconds = time.perf_counter() - self._began, time.process_time() - self._cpu_began
        logged = trainer.callback_metrics
        self.ours.append({"seconds": seconds, "cpu_seconds": cpu_seconds,
                          "generation_seconds": float(logged["perf/generation_seconds"]),
                          "response_length": float(logged["ppo/response_length"])})
        prompts = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), PAD_TOKEN)
        self.theirs.append(self.trl.iteration(prompts.cpu()))
        self._began, self._cpu_began = time.perf_counter(), time.process_time()


class _BenchmarkCLI(StageCLI):
    """The stage CLI with ``InterleavedTRL`` appended to the Trainer's callbacks."""

    callback: Callback | None = None

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(self.callback)
        return trainer


def run_ours(paths: dict[str, Path], size: str, *, batch_size: int, mini_batch_size: int, response_length: int,
             iterations: int, bf16: bool, run_dir: Path, callback: Callback) -> None:
    args = ["fit", "--config", f"configs/{size}/ppo.yaml", "--model.init_args.init_from", str(paths["policy"]),
            "--model.init_args.value_from", str(paths["rm_help"]),
            "--model.init_args.reward_helpfulness", str(paths["rm_help"]),
            "--model.init_args.reward_safety", str(paths["rm_safe"]),
            "--model.init_args.lr", str(LR), "--model.init_args.beta", str(KL_COEF),
            "--model.init_args.temperature", str(TEMPERATURE), "--model.init_args.max_new_tokens", str(response_length),
            "--model.init_args.mini_batch_size", str(mini_batch_size), "--model.init_args.ppo_epochs", "1",
            "--model.init_args.clip_eps", str(CLIP), "--model.init_args.value_clip_eps", str(CLIP),
            "--model.init_args.value_loss_coef", str(VALUE_COEF), "--model.init_args.gamma", str(GAMMA),
            "--model.init_args.lam", str(LAM), "--model.init_args.kl_estimator", "k1",
            "--model.init_args.missing_eos_penalty", str(MISSING_EOS_PENALTY),
            "--data.init_args.batch_size", str(batch_size), "--trainer.precision", "bf16-mixed" if bf16 else "32-true",
            "--trainer.max_steps", str(iterations * -(-batch_size // mini_batch_size)),
            "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]",
            "--checkpoint.every_n_train_steps", str(10**9), "--run.dir", str(run_dir), "--run.wandb", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    _BenchmarkCLI.callback = callback
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *args]  # LightningCLI reads sys.argv (as lightning_main does)
    try:
        _BenchmarkCLI()
    finally:
        sys.argv = saved_argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="micro", choices=["nano", "micro"])
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per PPO iteration")
    parser.add_argument("--mini-batches", type=int, default=4, help="mini-batches (optimizer steps) per iteration")
    parser.add_argument("--response-length", type=int, default=32, help="most tokens per response")
    parser.add_argument("--rounds", type=int, default=6, help="timed iterations per side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: both sides under bf16 autocast with fp32 weights (ours bf16-mixed, TRL bf16=True)")
    args = parser.parse_args(argv)
    if args.batch_size % args.mini_batches:
        parser.error(f"--batch-size {args.batch_size} is not a multiple of --mini-batches {args.mini_batches}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.chdir(REPO_ROOT):  # the configs name paths relative to the repository root
        ensure_toy_assets()
        print(f"PPO benchmark: {environment_line()}")
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            paths = make_models(args.size, root)
            trl = TRLSide(paths, batch_size=args.batch_size, mini_batches=args.mini_batches,
                          response_length=args.response_length, bf16=args.precision == "bf16", scratch=root / "trl")
            callback = InterleavedTRL(trl)
            run_ours(paths, args.size, batch_size=args.batch_size, mini_batch_size=args.batch_size // args.mini_batches,
                     response_length=args.response_length, iterations=args.rounds + 1,
                     bf16=args.precision == "bf16", run_dir=root / "run",
                     callback=callback)
    report(args, callback)


def report(args: argparse.Namespace, callback: InterleavedTRL) -> None:
    config = ModelConfig.from_name(args.size)
    rows, seconds, cpu = [], {}, {}
    for name, rounds in (("llama2_lit", callback.ours), ("trl 1.12", callback.theirs)):
        timed = rounds[1:]  # the first round carries one-off costs
        seconds[name] = statistics.median(r["seconds"] for r in timed)
        cpu[name] = statistics.median(r["cpu_seconds"] for r in timed)
        generation = statistics.median(r["generation_seconds"] for r in timed)
        share = statistics.median(r["generation_seconds"] / r["seconds"] for r in timed)
        rest = statistics.median(r["seconds"] - r["generation_seconds"] for r in timed)
        length = statistics.mean(r["response_length"] for r in timed)
        rows.append([name, f"{seconds[name]:.2f}", f"{cpu[name]:.2f}", f"{generation:.2f}", f"{100 * share:.0f}%",
                     f"{rest:.2f}", f"{length:.1f}"])
    print(f"\n{args.size} (dim {config.dim}, {config.n_layers} layers, {config.num_parameters():,} parameters), "
          f"{args.batch_size} prompts, {args.mini_batches} mini-batches of {args.batch_size // args.mini_batches} "
          f"(one optimizer step each), responses of at most {args.response_length} tokens, "
          f"medians of {len(callback.ours) - 1} interleaved iterations, {torch.get_num_threads()} threads, {args.precision}")
    print_table(["contender", "s/iteration", "CPU s/iteration", "generation s", "generation share", "rest s",
                 "mean response tokens"], rows)
    print(f"ratio trl / llama2_lit seconds per iteration: {seconds['trl 1.12'] / seconds['llama2_lit']:.2f}x "
          f"(CPU seconds: {cpu['trl 1.12'] / cpu['llama2_lit']:.2f}x)")


if __name__ == "__main__":
    main()
