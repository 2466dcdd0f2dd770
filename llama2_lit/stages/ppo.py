"""PPO with the safety-first reward (paper section 3.2.3, Eq. 3-4): RLHF-V5's last step.

One PPO *iteration* is one training batch of prompts (the paper: 512 prompts, mini-batches of 64,
one gradient step per mini-batch, clip 0.2):

1. **Rollout.** One response per prompt from the current policy, pure sampling (top-p 1) at
   ``temperature``; the same temperature divides the logits of every log-prob below (policy,
   old policy, reference), so the ratio and the KL are of the distribution that was sampled.
   Under FSDP2 the rollout goes through ``llama2_lit.rollout``'s engine: the full weights are
   gathered once into an inference copy, generation runs on it, and the copy is freed -- the
   paper's fix for generation being ~20x slower under FSDP.
2. **Scoring, without gradients.** The helpfulness and safety reward models score each full
   dialog at its last real token (the EOS when one was emitted; a truncated response is scored as
   it is and penalised by ``missing_eos_penalty``, never given an EOS it did not sample). R_c is
   the safety score where the prompt is safety-tagged or R_s < 0.15, the helpfulness score
   otherwise; ``R̃_c = WHITEN(LOGIT(R_c))`` over the whole rollout batch (every rank's rows).
   The per-token KL to the frozen reference π_0 (the checkpoint PPO starts from) is ``β · KL`` off
   every response token's reward; the score sits on the last response token (``llama2_lit.rlhf``).
   These passes run over chunks of ``mini_batch_size`` rows of like length, each cut to its own
   columns (``length_sorted_chunks``): the numbers of one padded pass, with less padding computed.
3. **Advantages.** GAE (γ = 1, λ = 0.95 by default) on the value model's estimates, whitened over
   the valid tokens of the whole batch.
4. **Update.** ``ppo_epochs`` passes over the batch in mini-batches, one optimizer step each
   (clipped policy loss + ``value_loss_coef`` x clipped value loss). On the first mini-batch the
   probability ratio must be exactly 1 -- the policy has not moved yet -- and it is checked: a
   mismatch means the rollout's log-probs were computed differently from the update's (dropout,
   another temperature, padding), the classic silent PPO bug.

What the paper does not specify, and what we do: the value model (a scalar-head copy initialised
from the helpfulness reward model, so it starts out knowing what a good answer is -- a value
model started from scratch spends the first iterations learning what the RM already knows --
with its output put into the returns' units by an affine map fitted on the first rollout,
``rlhf.fit_value_calibration``: the RM speaks raw logits, the returns whitened scores); GAE
and its γ/λ; per-token KL (``k1``, the log-ratio; ``k3`` available); the sampling temperature
(1.0 by default); mini-batches taken in order (the data loader already shuffles the prompts), so
that a run on N processes computes exactly the numbers of a run on one.

The paper's optimiser: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, clipping 1.0 and a
*constant* learning rate of 1e-6 (7B/13B/34B/70B); β = 0.01 at 7B and 13B, 0.005 at 34B and 70B.
Lightning steps no scheduler under manual optimisation, so ``optimizer_step`` here steps it; the
base's clipping (``on_before_optimizer_step``), logging, NaN guard and checkpoints still apply.
``trainer.max_steps`` counts optimizer steps (mini-batches), as Lightning does; one iteration is
``ppo_epochs x batch / mini_batch_size`` of them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from llama2_lit.generation import sample_seed, sequence_logprobs
from llama2_lit.rlhf import (
    Trajectory,
    explained_variance,
    fit_value_calibration,
    gae_advantages,
    kl_per_token,
    logit,
    masked_mean,
    penalized_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    safety_first_reward,
    uses_safety_reward,
    whiten_with_stats,
)
from llama2_lit.rollout import ConsolidatedRollout, RolloutEngine
from llama2_lit.stages.base import BatchContract, StageModule
from llama2_lit.stages.models import ModelSource


def length_sorted_chunks(attention_mask: Tensor, size: int) -> list[tuple[Tensor, int, int]]:
    """Rows of a padded batch in chunks of at most ``size``, shortest first, each with the column
    span ``[begin, end)`` that holds every real token of its rows.

    The rollout's scoring passes (no gradients: the old and reference log-probs, the values, the
    rewards) treat each row on its own, so which rows share a pass changes no number beyond float
    rounding -- only how many padding columns are computed: rows of like length together leave
    few. (The update's mini-batches keep the loader's order: their composition is part of the
    optimisation.) Chunks also bound the scoring's peak memory to a mini-batch's."""
    real = attention_mask.bool()
    columns = torch.arange(real.shape[1], device=real.device)
    first = torch.where(real, columns, real.shape[1]).min(1).values
    last = torch.where(real, columns, -1).max(1).values
    order = torch.argsort(last - first, stable=True)
    return [(rows, int(first[rows].min()), int(last[rows].max()) + 1) for rows in order.split(size)]


PROMPT_BATCH = BatchContract(required=("input_ids", "attention_mask", "is_safety"), token_ids=("input_ids",),
                             same_shape=(("attention_mask", "input_ids"),))
"""A batch of left-padded prompts (``PromptsDataModule``), with the safety tag of each."""


def rollout_seed(seed: int, iteration: int, prompt: int) -> int:
    """The sampling seed of one rollout response: a function of (seed, iteration, prompt's position in
    the global batch) only (``generation.sample_seed``), so a resumed run and a run on another
    number of processes draw the same responses."""
    return sample_seed(seed, iteration, prompt, 0)


class PPOModule(StageModule):
    """PPO on prompts with a safety-aware reward. See the module docstring.

    Args (besides ``StageModule``'s, which describe the policy):
        init_from: the policy to start from (the paper: the rejection-sampling checkpoint); it is
            also the frozen reference π_0 unless ``reference_from`` is given.
        value_from: the value model's initialisation (a reward-model checkpoint: the helpfulness RM).
        reward_helpfulness, reward_safety: the frozen reward models (stage ``.ckpt`` files or folders).
        reference_from: the frozen reference policy π_0 (default: ``init_from``).
        beta: the KL coefficient β of Eq. (4) (paper: 0.01 at 7B/13B, 0.005 at 34B/70B).
        temperature: sampling temperature of the rollouts, and of every log-prob.
        max_new_tokens: the longest response.
        mini_batch_size: prompts per optimizer step (per process; the paper: 64 of a 512 batch).
        ppo_epochs: passes over each rollout batch (the paper: one gradient step per mini-batch).
        clip_eps, value_clip_eps: PPO's ratio clip (paper: 0.2) and the value clip.
        value_loss_coef: weight of the value loss in the combined loss.
        gamma, lam: GAE's discount and λ.
        kl_estimator: ``k1`` (log-ratio) or ``k3``.
        missing_eos_penalty: subtracted from the whitened score of a response that never emitted EOS.
        calibrate_value: fit ``a · V + c`` to the first rollout's Monte-Carlo returns before its
            advantages are computed (``rlhf.fit_value_calibration``); False uses the value model's
            raw output.
        safety_threshold: R_s below it switches R_c to the safety score (paper: 0.15).
        seed: seed of the rollouts' sampling (with the iteration and the prompt's position).
    """

    stage = "ppo"
    batch_contract = PROMPT_BATCH

    def __init__(self, preset: str | None = None, init_from: str | None = None, *, value_from: str,
                 reward_helpfulness: str, reward_safety: str, reference_from: str | None = None,
                 config_overrides: dict[str, Any] | None = None, tokenizer_path: str | None = None,
                 lr: float = 1e-6, warmup_steps: int = 0, total_steps: int | None = None, min_lr_ratio: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-5, weight_decay: float = 0.1,
                 decay_embeddings: bool = True, grad_clip: float | None = 1.0, peak_flops: float | None = None,
                 beta: float = 0.01, temperature: float = 1.0, max_new_tokens: int = 64, mini_batch_size: int = 64,
                 ppo_epochs: int = 1, clip_eps: float = 0.2, value_clip_eps: float = 0.2,
                 value_loss_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95, kl_estimator: str = "k1",
                 missing_eos_penalty: float = 1.0, calibrate_value: bool = True, safety_threshold: float = 0.15,
                 seed: int = 0) -> None:
        if init_from is None:
            raise ValueError("PPO starts from a trained policy: set model.init_args.init_from "
                             "(the paper: the rejection-sampling checkpoint)")
        super().__init__(preset=preset, init_from=init_from, config_overrides=config_overrides,
                         tokenizer_path=tokenizer_path, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps,
                         min_lr_ratio=min_lr_ratio, betas=betas, eps=eps, weight_decay=weight_decay,
                         decay_embeddings=decay_embeddings, grad_clip=grad_clip, peak_flops=peak_flops)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (PPO samples its rollouts), got {temperature}")
        if mini_batch_size < 1 or ppo_epochs < 1:
            raise ValueError(f"mini_batch_size ({mini_batch_size}) and ppo_epochs ({ppo_epochs}) must be >= 1")
        if kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")
        self.automatic_optimization = False
        self.value = self.reference = self.reward_helpfulness = self.reward_safety = None
        # V = scale * (value head) + shift, and whether it was fitted yet: a buffer, so checkpoints
        # carry it and a resumed run neither refits nor forgets it.
        self.register_buffer("value_calibration", torch.tensor([1.0, 0.0, 0.0]))
        # The sampler's own log-probs are only a diagnostic: the old log-probs are recomputed with
        # the policy, so an engine generating from a bf16 copy changes nothing downstream.
        self.rollout_engine: RolloutEngine = ConsolidatedRollout()
        self._tokenizer = None

    # ------------------------------------------------------------------------------ models
    def model_sources(self) -> dict[str, ModelSource]:
        hp = self.hparams
        policy = super().model_sources()["model"]
        return {
            "model": policy,
            "value": ModelSource(init_from=hp.value_from, lm_head=False, scalar_head=True),
            "reference": ModelSource(init_from=hp.reference_from or hp.init_from, lm_head=True, trainable=False),
            "reward_helpfulness": ModelSource(init_from=hp.reward_helpfulness, lm_head=False, scalar_head=True,
                                              trainable=False),
            "reward_safety": ModelSource(init_from=hp.reward_safety, lm_head=False, scalar_head=True,
                                         trainable=False),
        }

    def configure_optimizers(self) -> dict[str, Any]:
        if self.hparams.total_steps is None:
            # Lightning counts training batches; here every batch takes several optimizer steps.
            self.hparams.total_steps = max(1, int(self.trainer.estimated_stepping_batches)) * self.steps_per_iteration
        return super().configure_optimizers()

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per PPO iteration: mini-batches per rollout batch, times ``ppo_epochs``."""
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        mini_batches = 1 if batch_size is None else -(-batch_size // self.hparams.mini_batch_size)
        return mini_batches * self.hparams.ppo_epochs

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """Prompt tokens, plus the response tokens once the rollout has run (``training_step`` adds
        them to the batch, so the throughput counts both)."""
        return int(batch["attention_mask"].sum()) + int(batch.get("response_tokens", 0))

    def model_flops_per_token(self, seq_len: int) -> float:
        """Per prompt-or-response token of an iteration: six forwards (generation, then the policy,
        the reference, the value model and both reward models scoring the rollout) and two
        forward-backwards (policy and value updates), i.e. 6 x 1/3 + 2 = 4 times one model's
        training FLOPs, counting every model at the policy's size."""
        return 4 * self.config.flops_per_token(seq_len)

    def batch_seq_len(self, batch: dict[str, Any]) -> int:
        return batch["input_ids"].shape[1] + self.hparams.max_new_tokens

    # ------------------------------------------------------------------------------ distributed helpers
    def _world(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's rows of ``x`` (same shape on every rank), concatenated rank by rank."""
        if self._world() == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self._world())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def _global_max(self, value: int) -> int:
        if self._world() == 1:
            return value
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor)

    def _global_sum(self, value: Tensor) -> Tensor:
        if self._world() == 1:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value

    def _global_stderr(self, x: Tensor) -> Tensor:
        """Standard error of the mean of ``x`` over the whole batch (every rank's rows): the noise that
        "non-negative within noise" is measured against (the k1 KL of one batch can be slightly
        negative while the true KL is positive)."""
        rows = self._gather_rows(x.float())
        return rows.std() / math.sqrt(rows.numel()) if rows.numel() > 1 else torch.zeros(())

    def _whiten_global(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, float, float]:
        """WHITEN over the whole batch, every rank's rows (so N processes compute one process's numbers)."""
        rank = dist.get_rank() if self._world() > 1 else 0
        stats = whiten_with_stats(self._gather_rows(x), None if mask is None else self._gather_rows(mask))
        rows = x.shape[0]
        return stats.whitened[rank * rows:(rank + 1) * rows], stats.mean, stats.std

    # ------------------------------------------------------------------------------ rollout
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from llama2_lit.tokenizer import Tokenizer

            path = self._tokenizer_path()
            if path is None:
                raise ValueError("PPO needs the tokenizer's EOS id: set model.init_args.tokenizer_path "
                                 "or the data module's tokenizer_path")
            self._tokenizer = Tokenizer(path)
        return self._tokenizer

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], iteration: int,
                calibrate: bool = False) -> tuple[Trajectory, dict[str, Tensor]]:
        """Sample, score and compute advantages for one batch of prompts (steps 1-3 above).
        ``calibrate``: fit the value model's affine map on this rollout if it was not fitted yet."""
        hp = self.hparams
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        rank, world = (dist.get_rank(), self._world()) if self._world() > 1 else (0, 1)
        # Row r of rank k is prompt r * world + k of the global batch (the loaders deal rows round-robin).
        seeds = [rollout_seed(hp.seed, iteration, row * world + rank) for row in range(len(prompts))]
        began = time.perf_counter()
        out = self.generate_rollouts(prompts, seeds)
        generation_seconds = time.perf_counter() - began

        # Pad responses to the longest of the global batch, so every rank's tensors align for the
        # batch-wide statistics.
        width = self._global_max(out.response_ids.shape[1])
        pad = width - out.response_ids.shape[1]
        response_ids = F.pad(out.response_ids, (0, pad))
        response_mask = F.pad(out.response_mask, (0, pad))
        query_ids, query_mask = out.prompt_ids, out.prompt_mask
        input_ids = torch.cat([query_ids, response_ids], 1)
        attention_mask = torch.cat([query_mask, response_mask], 1)
        scored = torch.cat([torch.zeros_like(query_mask), response_mask], 1)
        P = query_ids.shape[1]

        logprobs, entropy, ref_logprobs, values = (torch.zeros_like(input_ids, dtype=torch.float32) for _ in range(4))
        for rows, begin, end in length_sorted_chunks(attention_mask, hp.mini_batch_size):
            ids, real, target = (x[rows, begin:end] for x in (input_ids, attention_mask, scored))
            logprobs[rows, begin:end], entropy[rows, begin:end] = sequence_logprobs(
                self.model, ids, real, response_mask=target, temperature=hp.temperature, return_entropy=True)
            ref_logprobs[rows, begin:end] = sequence_logprobs(self.reference, ids, real, response_mask=target,
                                                              temperature=hp.temperature)
            values[rows, begin:end] = self._values(ids, real)
        logprobs, entropy, ref_logprobs, values = (x[:, P:] for x in (logprobs, entropy, ref_logprobs, values))

        r_help, r_safe = self.reward_scores(input_ids, attention_mask, response_mask, batch)
        is_safety = batch["is_safety"].to(self.device).bool()
        r_c = safety_first_reward(r_help, r_safe, is_safety, threshold=hp.safety_threshold)
        score, score_mean, score_std = self._whiten_global(logit(r_c))
        valid = response_mask.bool()
        kl = kl_per_token(logprobs, ref_logprobs, hp.kl_estimator) * valid
        missing_eos = ~out.eos_emitted.to(self.device)
        rewards = penalized_token_rewards(score, kl, response_mask, beta=hp.beta, missing_eos=missing_eos,
                                          missing_eos_penalty=hp.missing_eos_penalty)
        # Reward-to-go (GAE with λ = 1 and V = 0): what V predicts, independent of V.
        monte_carlo_returns = gae_advantages(rewards, torch.zeros_like(values), response_mask, gamma=hp.gamma,
                                             lam=1.0)[1]
        if calibrate and hp.calibrate_value and not bool(self.value_calibration[2]):
            values = self._calibrate_value(values, monte_carlo_returns, response_mask)
        advantages, returns = gae_advantages(rewards, values, response_mask, gamma=hp.gamma, lam=hp.lam)
        advantages, _, _ = self._whiten_global(advantages, response_mask)
        trajectory = Trajectory(query_ids, query_mask, response_ids, response_mask, logprobs, ref_logprobs, values,
                                score - hp.missing_eos_penalty * missing_eos.float(), rewards, advantages, returns)

        # Sampler log-probs vs the recomputed ones: equal up to float noise unless something differs.
        sampler = F.pad(out.logprobs, (0, pad))
        stats = {
            "ppo/reward_rc": r_c.mean(), "ppo/reward_helpfulness": r_help.mean(), "ppo/reward_safety": r_safe.mean(),
            "ppo/safety_reward_share": uses_safety_reward(r_safe, is_safety, hp.safety_threshold).float().mean(),
            "ppo/kl": (kl.sum(1)).mean(), "ppo/kl_stderr": self._global_stderr(kl.sum(1)),
            "ppo/kl_per_token": masked_mean(kl, valid),
            "ppo/entropy": masked_mean(entropy, valid), "ppo/response_length": response_mask.sum(1).float().mean(),
            "ppo/eos_fraction": out.eos_emitted.float().mean(),
            "ppo/score_mean_before_whiten": torch.tensor(score_mean),
            "ppo/score_std_before_whiten": torch.tensor(score_std),
            "ppo/value_explained_variance": explained_variance(self._gather_rows(values),
                                                               self._gather_rows(monte_carlo_returns),
                                                               self._gather_rows(response_mask)),
            "ppo/value_scale": self.value_calibration[0].clone(), "ppo/value_shift": self.value_calibration[1].clone(),
            "ppo/sampler_logprob_error": (sampler - logprobs).abs().masked_fill(~valid, 0).max(),
            "perf/generation_seconds": torch.tensor(generation_seconds),
        }
        self._oracle_rollout_stats(batch, out, stats)
        return trajectory, stats

    def reward_scores(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                      batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """R_h and R_s of each rollout, (B,) each, on the sigmoid scale: the frozen reward models read at
        the dialog's last real token. ``input_ids``/``attention_mask`` hold prompt and response
        (left-padded prompt, right-padded response), ``response_mask`` the response part alone.

        The one place PPO's reward comes from: a subclass that returns other scores (a rule, the toy
        world's oracle, a test's synthetic reward) trains against them with everything else --
        R_c, whitening, the KL penalty, GAE -- unchanged."""
        r_help = torch.empty(input_ids.shape[0], device=input_ids.device)
        r_safe = torch.empty_like(r_help)
        for rows, begin, end in length_sorted_chunks(attention_mask, self.hparams.mini_batch_size):
            ids, real = input_ids[rows, begin:end], attention_mask[rows, begin:end]
            r_help[rows] = self.reward_helpfulness.score_sequences(ids, real)
            r_safe[rows] = self.reward_safety.score_sequences(ids, real)
        return torch.sigmoid(r_help), torch.sigmoid(r_safe)

    def generate_rollouts(self, prompts: list[list[int]], seeds: list[int]):
        """One response per prompt: pure sampling (top-p 1) at ``temperature``, through the rollout
        engine (under FSDP2 a consolidated copy of the policy, gathered once and freed after)."""
        with self.rollout_engine.rollout(self.model) as engine:
            return engine.generate(prompts, max_new_tokens=self.hparams.max_new_tokens,
                                   temperature=self.hparams.temperature, top_p=1.0, eos_id=self.tokenizer.eos_id,
                                   generator=seeds)

    def _values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """V of the state before each token, (B, S) fp32 aligned with ``input_ids``: the value head
        at the position whose logits predict that token (one to the left; column 0 has none and is
        0), through the calibration's affine map."""
        values = F.pad(self.value.scalar_outputs(input_ids, attention_mask=attention_mask)[:, :-1].float(), (1, 0))
        scale, shift = self.value_calibration[0], self.value_calibration[1]
        return values * scale + shift

    def _calibrate_value(self, values: Tensor, returns: Tensor, response_mask: Tensor) -> Tensor:
        """Fit ``a · V + c`` to this rollout's Monte-Carlo returns (every rank's rows, so every rank
        fits the same map), store it, and return the calibrated values."""
        scale, shift = fit_value_calibration(self._gather_rows(values), self._gather_rows(returns),
                                             self._gather_rows(response_mask))
        self.value_calibration.copy_(torch.tensor([scale, shift, 1.0]))
        return values * scale + shift

    def _oracle_rollout_stats(self, batch: dict[str, Any], out, stats: dict[str, Tensor]) -> None:
        """The toy world's oracle on the training rollouts, next to the RM's reward (reward hacking shows
        as the two diverging). Skipped for records without the oracle's metadata."""
        if not all(meta for meta in batch.get("meta", [])) or "messages" not in batch:
            return
        from llama2_lit.data.oracle import judge

        texts = [self.tokenizer.decode(ids).strip() for ids in out.response_tokens()]
        judgements = [judge(messages, text, meta) for messages, text, meta in
                      zip(batch["messages"], texts, batch["meta"])]
        stats["ppo/oracle_helpfulness"] = torch.tensor(sum(j.helpfulness for j in judgements) / len(judgements))
        stats["ppo/oracle_violation"] = torch.tensor(sum(not j.safe for j in judgements) / len(judgements))

    # ------------------------------------------------------------------------------ update
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        if batch_idx == 0 or not getattr(self, "_batch_checked", False):
            self.check_batch(batch)
            self._batch_checked = True
        iteration = self.global_step // self.steps_per_iteration
        began = time.perf_counter()
        trajectory, stats = self.rollout(batch, iteration, calibrate=True)
        # The base counted the prompt tokens before the step; the responses exist only now.
        batch["response_tokens"] = int(trajectory.response_mask.sum())
        self.tokens_seen += batch["response_tokens"] * self.trainer.world_size
        optimizer = self.optimizers()
        rows = trajectory.query_ids.shape[0]
        first = True
        for _ in range(hp.ppo_epochs):
            for begin in range(0, rows, hp.mini_batch_size):
                mini = trajectory.select(slice(begin, begin + hp.mini_batch_size)).trim_padding()
                policy, value = self._losses(mini)
                loss = policy.loss + hp.value_loss_coef * value.loss
                self.check_finite_loss(loss, batch_idx)
                if first:
                    self._check_first_ratio(policy.ratio_mean)
                    first = False
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                self.optimizer_step(optimizer)
                # sync_dist: the mean over ranks, which for the (token-normalised) losses is the loss
                # of the whole mini-batch, the number one process would log.
                self.log_dict({"train/loss": loss.detach(), "ppo/policy_loss": policy.loss.detach(),
                               "ppo/value_loss": value.loss.detach(), "ppo/clip_fraction": policy.clip_fraction,
                               "ppo/value_clip_fraction": value.clip_fraction, "ppo/ratio_mean": policy.ratio_mean,
                               "ppo/approx_kl": policy.approx_kl}, sync_dist=True)
        self.log("ppo/iteration", float(iteration))
        # Rollout and update, this rank: the share generating is what the paper's FSDP slowdown
        # (section 3.2.3) would inflate.
        iteration_seconds = time.perf_counter() - began
        stats["perf/iteration_seconds"] = torch.tensor(iteration_seconds)
        stats["perf/generation_share"] = stats["perf/generation_seconds"] / iteration_seconds
        self.log_dict({key: value.float().to(self.device) for key, value in stats.items()}, sync_dist=True)
        self.log("ppo/reward", stats["ppo/reward_rc"], prog_bar=True, sync_dist=True)

    def _losses(self, mini: Trajectory):
        """Clipped policy and value losses of one mini-batch, scaled so that the mean over tokens is the
        mean over *every* rank's tokens (gradients are averaged over ranks)."""
        hp = self.hparams
        P = mini.query_ids.shape[1]
        input_ids = torch.cat([mini.query_ids, mini.response_ids], 1)
        attention_mask = torch.cat([mini.query_mask, mini.response_mask], 1)
        scored = torch.cat([torch.zeros_like(mini.query_mask), mini.response_mask], 1)
        logprobs = sequence_logprobs(self.model, input_ids, attention_mask, response_mask=scored,
                                     temperature=hp.temperature)[:, P:]
        values = self._values(input_ids, attention_mask)[:, P:]
        policy = ppo_policy_loss(logprobs, mini.logprobs, mini.advantages, mini.response_mask, clip_eps=hp.clip_eps)
        value = ppo_value_loss(values, mini.values, mini.returns, mini.response_mask, clip_eps=hp.value_clip_eps)
        local = mini.response_mask.sum().float()
        scale = local * self._world() / self._global_sum(local).clamp(min=1)
        return policy._replace(loss=policy.loss * scale), value._replace(loss=value.loss * scale)

    def _check_first_ratio(self, ratio_mean: Tensor) -> None:
        error = float((ratio_mean - 1).abs())
        self.log("ppo/first_ratio_error", error)
        if error > 1e-3:
            raise RuntimeError(f"PPO's first mini-batch has a mean probability ratio of {float(ratio_mean):.6f}, not 1: "
                               "the rollout's log-probs were not computed like the update's (temperature, "
                               "padding, dropout or precision differ)")

    def optimizer_step(self, optimizer) -> None:
        """One optimizer step under manual optimisation: the base's clipping runs in
        ``on_before_optimizer_step``; the schedule is stepped here (Lightning does not)."""
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    # ------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """RM reward (R_c, before whitening) of responses to held-out prompts."""
        trajectory, stats = self.rollout(batch, iteration=-1 - batch_idx)
        self.log("val/reward_rc", stats["ppo/reward_rc"], batch_size=trajectory.query_ids.shape[0])
        self.log("val/kl", stats["ppo/kl"], batch_size=trajectory.query_ids.shape[0])
        if "ppo/oracle_helpfulness" in stats:
            self.log("val/oracle_helpfulness_sampled", stats["ppo/oracle_helpfulness"],
                     batch_size=trajectory.query_ids.shape[0])
