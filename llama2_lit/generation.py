"""Sampling from the model: batched, KV-cached, seeded, with the log-probs RLHF needs.

Generation is the hot path of RLHF (75-80% of a PPO step in DeepSpeed-Chat and OpenRLHF), so it
must be exact *and* fast:

* **Exact.** Prompts are left-padded; the model's ``KVCache`` keeps padding masked forever and
  counts positions over real tokens only, so a row decodes exactly as it would alone. Sampling is
  Meta's rule (``sample_top_p`` in ``llama/generation.py``): ``softmax(logits / T)``, top-p keeps the
  smallest prefix of the sorted distribution whose mass reaches ``top_p`` (the crossing token
  included), renormalises, samples; ``T == 0`` is greedy.
* **Log-probs for PPO.** Every sampled token comes with ``log_softmax(logits / T)`` of that token
  over the *full* vocabulary: the policy's own distribution at temperature T, which is what PPO's
  importance ratio and KL penalty need (paper section 3.2.3, "PPO"). Top-p truncation is a
  sampling choice that this log-prob deliberately ignores, so **PPO rollouts must use
  ``top_p=1.0``**, otherwise the samples do not come from the distribution the
  log-probs describe. At ``T == 0`` (greedy) the log-probs are of the untempered distribution,
  ``log_softmax(logits)`` (T = 1). ``GenerationOutput.logprob_temperature`` records which, and
  ``sequence_logprobs`` recomputes the same numbers with one forward pass.
* **Seeded and batch-invariant.** Randomness enters only through one uniform number per (row,
  step), drawn up front on the CPU, and sampling is by inverse CDF (the same distribution as
  Meta's ``torch.multinomial``). Given a seed, results do not depend on the global RNG state or on
  the device; with per-row seeds a row samples the same tokens whatever else is in the batch.
  ``SampleSeeds`` hands out such seeds for RL (several samples per prompt, round after round)
  from a state of two integers that a checkpoint stores, so a resumed run draws the same samples.
* **Fast.** The prompt is encoded once (one prefill pass, the LM head applied to its last position
  only); each decode step is one single-token forward pass plus a handful of tensor ops for
  sampling; outputs are preallocated; the host waits on the device only to ask "has every row
  finished?" (every step on CPU, every ``stop_check_interval`` steps on accelerators). Both
  passes run through ``llama2_lit.decoding.FusedDecoder`` (fused and, on the CPU, oneDNN-prepacked
  weights; few operators per step) where it applies, under CPU bf16 autocast too, else through
  the model itself (``Transformer.hidden_states`` with a cache: FSDP-sharded models, other
  autocasts, ``fused=False``); the tokens are the same. For large models, generate with bf16 weights
  (``load_model(..., dtype=torch.bfloat16)``, ``--dtype bfloat16``): the KV cache follows the
  weights' dtype and halves the memory traffic per step; logits and sampling stay fp32
  (``benchmarks/generation.py`` times both against Hugging Face).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llama2_lit.decoding import FusedDecoder, fused_decoder
from llama2_lit.model import KVCache, Transformer

# Meta's defaults for chat and text completion (``llama/generation.py`` and its example scripts).
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9

Seed = int | Sequence[int] | torch.Generator | None


# ---------------------------------------------------------------------------------------- output
@dataclass
class GenerationOutput:
    """Prompts and responses of one ``generate`` call, laid out for RLHF.

    The natural full sequence of row ``b`` is ``prompt_ids[b]`` (left-padded) followed by
    ``response_ids[b]`` (right-padded); ``sequences()`` returns exactly that, with its masks, ready
    for ``sequence_logprobs`` or a reward model. Padding positions hold token 0 and are never
    real (the masks say which positions are).
    """

    prompt_ids: Tensor
    """(batch, prompt_len) long, left-padded."""
    prompt_mask: Tensor
    """(batch, prompt_len) long, 1 on real prompt tokens."""
    response_ids: Tensor
    """(batch, response_len) long, right-padded; response_len = the longest response."""
    response_mask: Tensor
    """(batch, response_len) long, 1 on generated tokens, up to and including EOS when emitted."""
    logprobs: Tensor
    """(batch, response_len) float32: log-prob of each generated token under
    ``log_softmax(logits / logprob_temperature)`` over the full vocabulary; 0 where the mask is 0."""
    response_lengths: Tensor
    """(batch,) long: generated tokens per row, EOS included."""
    eos_emitted: Tensor
    """(batch,) bool: the row ended with EOS. False means it was truncated at ``max_new_tokens``
    (PPO's missing-EOS penalty reads this; never append an EOS to a truncated response)."""
    temperature: float
    """The sampling temperature (0 = greedy)."""
    top_p: float
    """The top-p used for sampling (1.0 = pure sampling, what PPO needs)."""
    logprob_temperature: float
    """The temperature of the distribution ``logprobs`` are of: ``temperature``, or 1.0 when greedy."""
    num_samples: int = 1
    """Samples per prompt: rows ``i * num_samples ... (i + 1) * num_samples - 1`` answer prompt ``i``."""

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_lengths(self) -> Tensor:
        """(batch,) long: real prompt tokens per row."""
        return self.prompt_mask.sum(-1)

    def sequences(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, response_mask)``, each (batch, prompt_len + response_len).

        ``input_ids[b]`` is the left-padded prompt followed by the right-padded response;
        ``response_mask`` is 1 exactly on response tokens, so
        ``sequence_logprobs(model, input_ids, attention_mask, response_mask=response_mask,
        temperature=out.logprob_temperature)[:, prompt_len:]`` reproduces ``logprobs``.
        """
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        response_mask = torch.cat([torch.zeros_like(self.prompt_mask), self.response_mask], dim=1)
        return input_ids, attention_mask, response_mask

    def response_tokens(self, *, include_eos: bool = False) -> list[list[int]]:
        """Per-row generated token ids as Python lists (EOS dropped unless ``include_eos``)."""
        lengths = self.response_lengths - (self.eos_emitted.long() if not include_eos else 0)
        return [row[:n].tolist() for row, n in zip(self.response_ids, lengths.tolist())]

    def prompt_tokens(self) -> list[list[int]]:
        """Per-row prompt token ids as Python lists (padding removed)."""
        width = self.prompt_ids.shape[1]
        return [row[width - n:].tolist() for row, n in zip(self.prompt_ids, self.prompt_lengths.tolist())]


# ---------------------------------------------------------------------------------------- sampling
def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Meta's top-p (nucleus) rule as a distribution, in the original token order.

    Sort descending, ``cumsum``, zero every token whose mass *before* it already exceeds ``top_p``
    (``cumsum - p_i > top_p``; this keeps the smallest prefix reaching ``top_p``, crossing token
    included), renormalise. ``probs`` (..., vocab) sums to 1 along the last dimension.
    """
    _check_top_p(top_p)
    probs_sorted, order = probs.sort(dim=-1, descending=True)
    cumsum = probs_sorted.cumsum(dim=-1)
    probs_sorted = probs_sorted.masked_fill(cumsum - probs_sorted > top_p, 0.0)
    probs_sorted = probs_sorted / probs_sorted.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, probs_sorted)


def sample_next_token(logits: Tensor, *, temperature: float, top_p: float = 1.0,
                      uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One sampling step: ``(tokens, logprobs)``, both (batch,), from logits (batch, vocab).

    ``temperature == 0`` is greedy (argmax) and ``logprobs`` are then ``log_softmax(logits)``.
    Otherwise the token is drawn from ``top_p_filter(softmax(logits / T), top_p)`` by inverse CDF
    with ``uniforms`` (batch,) in [0, 1): the token whose cumulative-probability interval contains
    ``(1 - u) * total``. ``(1 - u)`` lies in (0, 1], so a zero-probability token can never be drawn.
    ``logprobs`` are ``log_softmax(logits / T)`` of the drawn tokens over the full vocabulary,
    whatever ``top_p`` is (see the module docstring: PPO rollouts use ``top_p=1``).
    """
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        # log_softmax is one vectorised kernel; logsumexp on the CPU is several (max, sub, exp, ...).
        return tokens, logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    if uniforms is None:
        raise ValueError("sampling with temperature > 0 needs uniforms (one per row)")
    logprobs_all = (logits / temperature).log_softmax(dim=-1)
    probs = logprobs_all.exp()
    threshold = 1.0 - uniforms[:, None]
    if top_p < 1.0:
        probs_sorted, order = probs.sort(dim=-1, descending=True)
        cumsum = probs_sorted.cumsum(dim=-1)
        # The kept tokens are a prefix of the sorted order (cumsum - p_i is non-decreasing); the
        # search stays inside it because the target never exceeds the prefix's own cumsum.
        n_kept = (cumsum - probs_sorted <= top_p).sum(dim=-1, keepdim=True)
        target = threshold * cumsum.gather(-1, n_kept - 1)
        tokens = order.gather(-1, torch.searchsorted(cumsum, target))
    else:
        cumsum = probs.cumsum(dim=-1)
        tokens = torch.searchsorted(cumsum, threshold * cumsum[:, -1:])
    return tokens.squeeze(-1), logprobs_all.gather(-1, tokens).squeeze(-1)


def draw_uniforms(generator: Seed, batch_size: int, steps: int) -> Tensor:
    """The (batch, steps) uniform numbers in [0, 1) that drive sampling, on the CPU.

    ``generator`` may be:
      * a sequence of ints, one seed per row: row ``b`` draws from its own stream seeded with
        ``generator[b]``, so its samples do not depend on the other rows (batch invariance);
      * an int: per-row seeds derived from it (reproducible, but row ``b`` of a batch differs from
        the same prompt generated alone with that int; pass a list for that);
      * a ``torch.Generator``: all numbers drawn from it, advancing its state (use one generator
        across many calls for fresh samples every call, e.g. PPO rollouts);
      * None: torch's global generator (not reproducible unless seeded globally).
    A row's stream is consumed in step order, so generating more tokens never changes the first ones.
    """
    if isinstance(generator, torch.Generator):
        return torch.rand(batch_size, steps, generator=generator, device=generator.device).cpu()
    if generator is None:
        return torch.rand(batch_size, steps)
    if isinstance(generator, int):
        seeder = torch.Generator().manual_seed(generator)
        row_seeds = torch.randint(0, 2**62, (batch_size,), generator=seeder).tolist()
    else:
        row_seeds = list(generator)
        if len(row_seeds) != batch_size:
            raise ValueError(f"got {len(row_seeds)} per-row seeds for a batch of {batch_size} prompts")
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(int(seed))) for seed in row_seeds]
    return torch.stack(rows)


@dataclass
class SampleSeeds:
    """Per-sample seeds for sampling many prompts, several times each, round after round (RL).

    The seed of sample ``j`` of the prompt named ``key`` in round ``round`` is a hash of
    ``(seed, round, key, j)`` and of nothing else: not of the batch the prompt lands in, the batch
    size, the device or rank that samples it, or what was sampled before. So the same prompt gets
    the same samples however the work is split, and the whole state is two integers:
    ``state_dict()`` goes into a checkpoint, ``load_state_dict()`` restores it, and a resumed run
    draws exactly the samples the uninterrupted run would have. ``key`` is a stable name of the
    prompt (its index in the prompt file, or its record id), never its position in a batch.

        seeds = SampleSeeds(seed=0)
        out = generate(model, batch, num_samples=4, generator=seeds(batch_keys, 4), ...)
        seeds.next_round()  # the next iteration draws fresh samples of the same prompts
    """

    seed: int = 0
    round: int = 0

    def __call__(self, keys: Sequence[int | str], num_samples: int = 1) -> list[int]:
        """One seed per (prompt, sample), prompt-major: the order of ``generate(num_samples=...)``'s rows."""
        return [sample_seed(self.seed, self.round, key, sample) for key in keys for sample in range(num_samples)]

    def next_round(self) -> None:
        self.round += 1

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "round": self.round}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.round = int(state["seed"]), int(state["round"])


def sample_seed(seed: int, round: int, key: int | str, sample: int) -> int:
    """A 63-bit seed that depends only on its arguments (BLAKE2b of their ``repr``, platform-independent)."""
    digest = hashlib.blake2b(repr((int(seed), int(round), key, int(sample))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------- generate
Prompts = Sequence[Sequence[int]] | Tensor | Mapping[str, Tensor]


def generate(model: Transformer, prompts: Prompts, *, max_new_tokens: int,
             temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, eos_id: int | None,
             generator: Seed = None, stop_check_interval: int | None = None,
             drop_finished: bool = True, attention_mask: Tensor | None = None,
             num_samples: int = 1, fused: bool | None = None) -> GenerationOutput:
    """Sample continuations of a batch of prompts with the KV cache.

    Args:
        model: a ``Transformer`` with an LM head (its mode is left alone; the core has no dropout).
        prompts: the prompts (BOS included by the caller), any lengths >= 1, as one of
            * token ids per prompt (lists);
            * a padded (batch, seq) tensor of ids with ``attention_mask`` (1 on real tokens, one
              contiguous run per row; left or right padding); no mask means every token is real;
            * a batch mapping with ``input_ids`` and ``attention_mask``, as
              ``llama2_lit.data.datamodules.PromptsDataModule`` yields it.
            A row generates exactly what its prompt would alone (same seed), whatever the padding.
        max_new_tokens: the most tokens generated per row; prompt + response must fit the context.
        temperature: 0 for greedy decoding; otherwise logits are divided by it.
        top_p: Meta's nucleus rule (1.0 = pure sampling; use 1.0 for PPO rollouts).
        eos_id: a row stops after emitting it; None never stops early (benchmarks).
        generator: the randomness (see ``draw_uniforms``); unused when greedy.
        stop_check_interval: decode steps between checks that every row has finished (each check
            waits for the device). Default: 1 on CPU, 8 elsewhere. Steps past a row's EOS are
            computed but never recorded, so the result does not depend on it.
        drop_finished: drop finished rows from the decoding batch (``KVCache.keep_rows``, one copy
            of the cache each time a quarter of the remaining rows have finished), so ragged
            batches stop paying for rows that are done. False keeps computing them. The result is
            identical either way.
        attention_mask: the padding mask of a tensor of ``prompts``.
        num_samples: samples per prompt. The output has ``len(prompts) * num_samples`` rows, prompt
            by prompt (rows ``i * num_samples`` to ``(i + 1) * num_samples - 1`` answer prompt
            ``i``); per-row seeds (``generator``) are then one per sample, in that order
            (``SampleSeeds`` makes them).
        fused: run the passes through ``llama2_lit.decoding.FusedDecoder`` (default: where
            ``FusedDecoder.supports(model)``); False: through the model's own modules (to compare).

    Returns:
        A ``GenerationOutput``; its tensors live on the model's device and are ordinary tensors
        (usable in autograd, unlike inference-mode tensors).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    _check_top_p(top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    prompts = prompt_lists(prompts, attention_mask)
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if num_samples > 1:
        if isinstance(generator, Sequence) and len(generator) != len(prompts) * num_samples:
            raise ValueError(f"got {len(generator)} per-row seeds for {len(prompts)} prompts x {num_samples} samples; "
                             "pass one seed per sample (SampleSeeds makes them)")
        prompts = [prompt for prompt in prompts for _ in range(num_samples)]
    vocab_size, context = model.config.vocab_size, model.config.max_seq_len
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty (it needs at least a BOS token)")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {row} has token ids outside [0, {vocab_size})")
        if len(prompt) + max_new_tokens > context:
            raise ValueError(f"prompt {row} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                             f"it exceeds the context length of {context}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab_size})")
    if model.output is None:
        raise ValueError("generate needs a Transformer with an LM head (lm_head=True)")
    if fused is None:
        fused = FusedDecoder.supports(model)
    elif fused and not FusedDecoder.supports(model):
        raise ValueError("FusedDecoder does not compute this model's generation here (see FusedDecoder.supports)")

    parameter = next(model.parameters())
    device = parameter.device
    uniforms = draw_uniforms(generator, len(prompts), max_new_tokens).to(device) if temperature > 0 else None
    if stop_check_interval is None:
        stop_check_interval = 1 if device.type == "cpu" else 8
    with torch.inference_mode():
        out = _generate(model, prompts, max_new_tokens, temperature, top_p, eos_id, uniforms,
                        stop_check_interval, drop_finished, device, parameter.dtype, fused)
    # Inference tensors cannot enter autograd later (PPO feeds these ids to a training forward).
    return GenerationOutput(**{k: v.clone() if isinstance(v, Tensor) else v for k, v in out.items()},
                            num_samples=num_samples)


def prompt_lists(prompts: Prompts, attention_mask: Tensor | None = None) -> list[list[int]]:
    """The prompts of ``generate`` as token-id lists, padding removed (see its ``prompts``)."""
    if isinstance(prompts, Mapping):
        if attention_mask is not None:
            raise ValueError("pass the padding mask inside the batch or as attention_mask, not both")
        if "input_ids" not in prompts:
            raise ValueError(f"a batch of prompts needs 'input_ids' (and 'attention_mask'); got {sorted(prompts)}")
        prompts, attention_mask = prompts["input_ids"], prompts.get("attention_mask")
    if not isinstance(prompts, Tensor):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a padded tensor of prompts, not with lists of ids")
        return [list(prompt) for prompt in prompts]
    if prompts.dim() != 2:
        raise ValueError(f"a tensor of prompts must be (batch, seq), got shape {tuple(prompts.shape)}")
    ids = prompts.cpu()
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    if real.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(real.shape)} and prompts {tuple(ids.shape)} differ in shape")
    rows = []
    for row, (row_ids, row_real) in enumerate(zip(ids, real)):
        where = row_real.nonzero().squeeze(1)
        if len(where) and int(where[-1] - where[0]) + 1 != len(where):
            raise ValueError(f"row {row} of attention_mask has padding between real tokens")
        rows.append(row_ids[where].tolist())
    return rows


def _generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
              top_p: float, eos_id: int | None, uniforms: Tensor | None, stop_check_interval: int,
              drop_finished: bool, device: torch.device, dtype: torch.dtype, fused: bool) -> dict:
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    prompt_len = max(lengths)
    prompt_ids = torch.zeros(batch, prompt_len, dtype=torch.long)
    prompt_mask = torch.zeros(batch, prompt_len, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        prompt_ids[row, prompt_len - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[row, prompt_len - len(prompt):] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    # Preallocated outputs. A row's slots after its EOS hold garbage (rows still in the batch) or
    # zeros (rows dropped from it) until everything past the first EOS is masked at the end.
    response_ids = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)

    cache = KVCache(model.config, batch, prompt_len + max_new_tokens, device=device, dtype=dtype)
    padded = min(lengths) < prompt_len
    # Prefill, then one step per token: fused and prepacked where that applies (``llama2_lit.decoding``),
    # else the model's own path. The LM head runs on the last position only (in fp32 under
    # autocast on both paths, as the model's forward computes it).
    if fused:
        decoder = fused_decoder(model)
        logits = decoder.prefill(prompt_ids, cache, prompt_mask if padded else None)
        next_logits = decoder.step
    else:
        hidden = model.hidden_states(prompt_ids, attention_mask=prompt_mask if padded else None, cache=cache)
        logits = model.logits(hidden[:, -1])

        def next_logits(tokens: Tensor, cache: KVCache) -> Tensor:
            return model.logits(model.hidden_states(tokens[:, None], cache=cache)[:, -1])

    # The decoding batch shrinks as rows finish: ``rows`` maps its rows to output rows (None while
    # it is still the whole batch, so the common case writes plain slices).
    rows: Tensor | None = None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = max_new_tokens
    for step in range(max_new_tokens):
        tokens, token_logprobs = sample_next_token(
            logits, temperature=temperature, top_p=top_p,
            uniforms=None if uniforms is None else uniforms[:, step],
        )
        if rows is None:
            response_ids[:, step] = tokens
            logprobs[:, step] = token_logprobs
        else:
            response_ids[rows, step] = tokens
            logprobs[rows, step] = token_logprobs
        if eos_id is not None:
            finished |= tokens == eos_id
            if (step + 1) % stop_check_interval == 0:
                n_finished = int(finished.sum())  # the one host-device sync
                if n_finished == len(finished):
                    steps = step + 1
                    break
                # Dropping rows copies the cache once; do it when a quarter of the batch is done.
                if drop_finished and 4 * n_finished >= len(finished):
                    keep = (~finished).nonzero().squeeze(1)
                    cache.keep_rows(keep)
                    rows = keep if rows is None else rows[keep]
                    tokens, finished = tokens[keep], finished[keep]
                    uniforms = None if uniforms is None else uniforms[keep]
        if step + 1 < max_new_tokens:
            logits = next_logits(tokens, cache)

    response_ids, logprobs = response_ids[:, :steps], logprobs[:, :steps]
    if eos_id is None:
        eos_emitted = torch.zeros(batch, dtype=torch.bool, device=device)
        response_lengths = torch.full((batch,), steps, dtype=torch.long, device=device)
    else:
        is_eos = response_ids == eos_id
        eos_emitted = is_eos.any(-1)
        # The first EOS (included) ends a row; ``argmax`` of a 0/1 row finds the first 1.
        response_lengths = torch.where(eos_emitted, is_eos.int().argmax(-1) + 1, steps)
    width = int(response_lengths.max())  # rows may have finished between two checks
    response_mask = torch.arange(width, device=device) < response_lengths[:, None]
    response_ids = response_ids[:, :width].masked_fill(~response_mask, 0)
    logprobs = logprobs[:, :width].masked_fill(~response_mask, 0.0)
    response_mask = response_mask.long()
    return dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        logprobs=logprobs, response_lengths=response_lengths, eos_emitted=eos_emitted,
        temperature=float(temperature), top_p=float(top_p),
        logprob_temperature=float(temperature) if temperature > 0 else 1.0,
    )


# ---------------------------------------------------------------------------------------- scoring
def sequence_logprobs(model: Transformer, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                      response_mask: Tensor | None = None, prompt_lengths: Tensor | None = None,
                      temperature: float = 1.0, return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs of given tokens with one forward pass: ``out[b, t] = log p_T(input_ids[b, t] | input_ids[b, :t])``.

    ``p_T = softmax(logits / temperature)`` over the full vocabulary: the distribution
    ``generate`` reports (pass ``GenerationOutput.logprob_temperature``). Differentiable (PPO's
    policy loss calls it with gradients). The result has the shape of ``input_ids``, aligned with
    it, and is 0 outside the scored tokens, which are given by exactly one of:

    * ``response_mask`` (batch, seq): 1 on the tokens to score;
    * ``prompt_lengths`` (batch,): the number of real prompt tokens per row; every real token after
      them is scored (works for left- and right-padded rows).

    ``attention_mask`` (batch, seq) marks real tokens (None = all real). Scoring position 0 is an
    error: it has no context.

    ``return_entropy``: also return the entropy of ``p_T`` at each scored position (same layout),
    from the same logits (PPO logs it).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use 1.0 for greedy outputs), got {temperature}")
    if (response_mask is None) == (prompt_lengths is None):
        raise ValueError("pass exactly one of response_mask and prompt_lengths")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if response_mask is None:
        response_mask = real & (real.long().cumsum(-1) > prompt_lengths.to(input_ids.device)[:, None])
    scored = response_mask.bool()
    if scored[:, 0].any():
        raise ValueError("the first position of a sequence cannot be scored (it has no context)")
    mask = None if attention_mask is None or bool(real.all()) else attention_mask
    # The LM head only where a scored token is predicted: from the column before the first scored
    # one (a PPO batch's prompt columns, often most of it, need no logits, no log-softmax).
    first = int(scored.any(0).int().argmax()) if bool(scored.any()) else max(1, input_ids.shape[1] - 1)
    h = model.hidden_states(input_ids, attention_mask=mask)
    logits = model.logits(h[:, first - 1:-1])
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, first:, None]
    # Gather then subtract logsumexp: never materialises a second (batch, seq, vocab) tensor.
    log_normalizer = logits.logsumexp(dim=-1)
    token_logprobs = F.pad(logits.gather(-1, targets).squeeze(-1) - log_normalizer, (first, 0)).masked_fill(~scored, 0.0)
    if not return_entropy:
        return token_logprobs
    from llama2_lit.rlhf.ppo import entropy_from_logits

    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return token_logprobs, F.pad(entropy, (first, 0)).masked_fill(~scored, 0.0)


# ---------------------------------------------------------------------------------------- helpers
def _check_top_p(top_p: float) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
