"""Stage modules: schedule, optimizer groups, masked loss, exact resume, the NaN guard, activation
checkpointing and model building (fresh, from a checkpoint, mismatches)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

from llama2_lit.config import ModelConfig
from llama2_lit.data.loader import ResumableDataLoader
from llama2_lit.model import Transformer
from llama2_lit.parallelize import apply_activation_checkpointing
from llama2_lit.stages import (
    NonFiniteLossError,
    PretrainModule,
    SFTModule,
    next_token_loss,
    optimizer_param_groups,
    warmup_cosine_lr,
)
from llama2_lit.stages.base import WarmupCosine, rng_state, set_rng_state
from llama2_lit.stages.callbacks import InjectNonFinite, StageCheckpoint
from llama2_lit.stages.pretrain import unigram_perplexity

VOCAB = 128
SEQ = 16
TINY = {"vocab_size": VOCAB, "max_seq_len": SEQ}


# ------------------------------------------------------------------------------------ helpers
class CountingWindows(Dataset):
    """Windows of a deterministic token stream; labels are the inputs shifted by one (contract)."""

    def __init__(self, n: int, offset: int = 0) -> None:
        stream = (torch.arange(n * (SEQ + 1)) * 7 + offset) % 61 + 3
        self.windows = stream.view(n, SEQ + 1)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.windows[index]
        return {"input_ids": window[:-1].clone(), "labels": window[1:].clone()}


class WindowsData(L.LightningDataModule):
    """A tiny data module following the pretraining batch contract, with a resumable loader."""

    def __init__(self, n_train: int = 40, batch_size: int = 4) -> None:
        super().__init__()
        self.n_train, self.batch_size = n_train, batch_size

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(CountingWindows(self.n_train), batch_size=self.batch_size, shuffle=True, seed=3)

    def val_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(CountingWindows(8, offset=5), batch_size=4, shuffle=False)


class Recorder(Callback):
    """Per-step training losses (exact tensors) and one random draw per step."""

    def __init__(self) -> None:
        self.losses: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].detach().clone()


class DrawingPretrain(PretrainModule):
    """A pretraining module that also consumes the RNG in every step (as dropout or sampling would)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.draws: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        self.draws[self.global_step] = float(torch.rand(()))
        return super().training_step(batch, batch_idx)


def trainer(tmp_path: Path, max_steps: int, *, callbacks=(), every: int = 0, **kwargs) -> L.Trainer:
    checkpoint = [StageCheckpoint(dirpath=tmp_path / "checkpoints", filename="step-{step}", auto_insert_metric_name=False,
                                  save_last=True,
                                  every_n_train_steps=every, save_top_k=-1)] if every else []
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=[*checkpoint, *callbacks], enable_checkpointing=bool(every), **kwargs)


def module(cls=PretrainModule, **kwargs):
    kwargs = {"preset": "nano", "config_overrides": TINY, "lr": 3e-3, "warmup_steps": 2, "peak_flops": 1e11,
              **kwargs}
    return cls(**kwargs)


# ------------------------------------------------------------------------------------ schedule
def test_warmup_cosine_lr_values():
    lr = lambda step: warmup_cosine_lr(step, peak_lr=2.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr(0) == pytest.approx(0.2)            # linear warmup: (0 + 1) / 10 of the peak
    assert lr(4) == pytest.approx(1.0)
    assert lr(9) == pytest.approx(2.0)            # last warmup step is at the peak
    assert lr(10) == pytest.approx(2.0)           # cosine starts at the peak
    assert lr(60) == pytest.approx(0.2 + 1.8 * 0.5)  # half way: the mean of peak and floor
    assert lr(35) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr(110) == pytest.approx(0.2)          # ends at 10% of the peak
    assert lr(500) == pytest.approx(0.2)          # and stays there
    decay = [lr(step) for step in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    with pytest.raises(ValueError, match="bad schedule"):
        warmup_cosine_lr(0, peak_lr=1.0, warmup_steps=1, total_steps=0)


def test_lambda_lr_follows_the_pure_schedule_and_survives_a_state_dict_round_trip():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=3e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(3, 20, 0.1))
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [warmup_cosine_lr(step, peak_lr=3e-4, warmup_steps=3, total_steps=20) for step in range(8)]
    assert seen == pytest.approx(expected, rel=1e-12)
    # A new scheduler loaded from the state dict continues the same sequence.
    optimizer2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    schedule2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, WarmupCosine(1, 2, 0.5))
    optimizer2.load_state_dict(optimizer.state_dict())
    schedule2.load_state_dict(schedule.state_dict())
    assert schedule2.lr_lambdas[0] == WarmupCosine(3, 20, 0.1)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(warmup_cosine_lr(8, peak_lr=3e-4, warmup_steps=3,
                                                                             total_steps=20), rel=1e-12)


# ------------------------------------------------------------------------------------ optimizer
def test_weight_decay_on_matrices_not_on_norm_gains():
    model = Transformer(ModelConfig.from_name("nano", **TINY), scalar_head=True)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer_param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = sorted(names[id(p)] for p in no_decay["params"])
    n_layers = model.config.n_layers
    assert no_decay_names == sorted(["norm.weight"] + [f"layers.{i}.{norm}.weight" for i in range(n_layers)
                                                       for norm in ("attention_norm", "ffn_norm")])
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"tok_embeddings.weight", "output.weight", "score.weight", "layers.0.attention.wq.weight"} <= decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    _, no_decay = optimizer_param_groups(model, 0.1, decay_embeddings=False)
    assert "tok_embeddings.weight" in {names[id(p)] for p in no_decay["params"]}


# ------------------------------------------------------------------------------------ losses
def test_next_token_loss_counts_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[3, -100, 4, -100, 0], [-100, -100, 10, 2, -100]])
    loss_sum, tokens = next_token_loss(logits, labels)
    keep = labels != -100
    expected = -torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep][:, None]).sum()
    assert tokens.item() == 5
    torch.testing.assert_close(loss_sum, expected)
    loss_sum.backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep].abs().sum(-1) > 0)


def test_unigram_perplexity():
    # Training counts 3:1 of tokens 0 and 1 (no smoothing): p = 0.75, 0.25.
    train = torch.tensor([0, 0, 0, 1])
    assert unigram_perplexity(train, torch.tensor([0, 1]), 2, smoothing=0.0) == pytest.approx(
        math.exp(-(math.log(0.75) + math.log(0.25)) / 2))
    # Uniform counts: the perplexity is the vocabulary size; smoothing gives unseen tokens mass.
    assert unigram_perplexity(torch.arange(8), torch.tensor([3, 5]), 8) == pytest.approx(8.0)
    assert math.isfinite(unigram_perplexity(train, torch.tensor([2]), 3))


def test_sft_step_backpropagates_only_through_answer_positions():
    sft = module(SFTModule)
    sft.model = Transformer(ModelConfig.from_name("nano", **TINY))
    input_ids = torch.randint(3, VOCAB, (1, SEQ))
    labels = torch.full((1, SEQ), -100)
    labels[0, 10:14] = input_ids[0, 11:15]  # an "answer" of 4 tokens
    logits = sft.model(input_ids)
    logits.retain_grad()
    loss_sum, tokens = next_token_loss(logits, labels)
    (loss_sum / tokens).backward()
    assert tokens.item() == 4
    assert torch.all(logits.grad[0, :10] == 0) and torch.all(logits.grad[0, 14:] == 0)
    expected = F.cross_entropy(logits[0, 10:14].detach(), labels[0, 10:14])
    torch.testing.assert_close(loss_sum.detach() / 4, expected)


def test_sft_defaults_are_the_papers():
    sft = SFTModule(preset="nano")
    assert sft.hparams.lr == 2e-5 and sft.hparams.weight_decay == 0.1 and sft.hparams.warmup_steps == 0
    assert tuple(sft.hparams.betas) == (0.9, 0.95) and sft.hparams.eps == 1e-5 and sft.hparams.grad_clip == 1.0


# ------------------------------------------------------------------------------------ resume
def test_resume_reproduces_the_uninterrupted_run_step_for_step(tmp_path):
    total, stop = 12, 5
    kwargs = {"total_steps": total}

    L.seed_everything(7)
    straight, straight_log = module(DrawingPretrain, **kwargs), Recorder()
    trainer(tmp_path / "a", total, callbacks=[straight_log]).fit(straight, WindowsData())

    L.seed_everything(7)
    first, first_log = module(DrawingPretrain, **kwargs), Recorder()
    trainer(tmp_path / "b", stop, callbacks=[first_log], every=100).fit(first, WindowsData())
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop  # saved at the final step

    L.seed_everything(7)  # a new process would seed again: the checkpoint must win
    resumed, resumed_log = module(DrawingPretrain, **kwargs), Recorder()
    trainer(tmp_path / "b", total, callbacks=[resumed_log], every=100).fit(resumed, WindowsData(), ckpt_path=last)

    assert sorted(first_log.losses) == list(range(1, stop + 1))
    assert sorted(resumed_log.losses) == list(range(stop + 1, total + 1))
    for step in range(1, total + 1):
        other = first_log.losses.get(step, resumed_log.losses.get(step))
        assert torch.equal(straight_log.losses[step], other), f"loss of step {step} differs after resume"
    assert {**first.draws, **resumed.draws} == straight.draws  # RNG states restored per step
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.tokens_seen == straight.tokens_seen == total * 4 * SEQ


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(()))
    torch.save(state, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(())) == expected


# ------------------------------------------------------------------------------------ NaN guard
@pytest.mark.parametrize("target", ["lr", "weights"])
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, target):
    L.seed_everything(0)
    model = module(total_steps=20)
    run = trainer(tmp_path, 20, every=2, callbacks=[InjectNonFinite(at_step=5, target=target)])
    message = "weights became non-finite" if target == "lr" else "non-finite training loss"
    with pytest.raises(NonFiniteLossError, match=message):
        run.fit(model, WindowsData())
    # Steps 1..5 trained; with a NaN learning rate step 6's update poisons the weights and the
    # checkpoint of step 6 is refused, with NaN weights step 6's loss is NaN: either way the last
    # checkpoint on disk is step 4's, and it is finite.
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["last.ckpt", "step-2.ckpt", "step-4.ckpt"]


def test_last_links_the_newest_checkpoint_even_without_top_k_files(tmp_path):
    # save_top_k 0: no step-N files; last still needs a whole checkpoint of its own, and only the newest stays.
    L.seed_everything(0)
    checkpoint = StageCheckpoint(dirpath=tmp_path, filename="step-{step}", auto_insert_metric_name=False,
                                 save_last=True, every_n_train_steps=2, save_top_k=0)
    L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[checkpoint]).fit(module(total_steps=5),
                                                                                            WindowsData())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-step-5.ckpt", "last.ckpt"]
    assert (tmp_path / "last.ckpt").readlink() == Path("last-step-5.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5
    assert Path(saved["callbacks"][checkpoint.state_key]["last_model_path"]) == tmp_path / "last.ckpt"


# ------------------------------------------------------------------------------------ the core
def test_activation_checkpointing_changes_neither_numbers_nor_names():
    torch.manual_seed(0)
    config = ModelConfig.from_name("nano", **TINY)
    plain = Transformer(config)
    wrapped = Transformer(config)
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    for model in (plain, wrapped):
        model(tokens).logsumexp(-1).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_model_is_built_from_a_preset_or_from_a_stage_checkpoint(tmp_path):
    L.seed_everything(0)
    first = module(total_steps=4)
    trainer(tmp_path, 2, every=2).fit(first, WindowsData())
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["model_config"] == first.config.to_dict()
    assert saved["hyper_parameters"]["preset"] == "nano"

    # init_from a stage checkpoint: the same weights, a longer context allowed (no shape changes).
    second = SFTModule(preset=None, init_from=str(ckpt), config_overrides={"max_seq_len": 32})
    second.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    second.configure_model()
    assert second.config.max_seq_len == 32 and second.config.vocab_size == VOCAB
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(ValueError, match="would change the shapes"):
        bad = SFTModule(preset=None, init_from=str(ckpt), config_overrides={"dim": 128})
        bad.trainer = second.trainer
        bad.configure_model()
    with pytest.raises(ValueError, match="does not have the shape of preset 'nano' \\(vocab_size: checkpoint 128"):
        bad = SFTModule(preset="nano", init_from=str(ckpt))
        bad.trainer = second.trainer
        bad.configure_model()
    with pytest.raises(ValueError, match="does not have the shape of preset 'micro'"):
        bad = SFTModule(preset="micro", init_from=str(ckpt))
        bad.trainer = second.trainer
        bad.configure_model()
    with pytest.raises(KeyError, match="unknown model preset"):
        PretrainModule(preset="nanoo")


def test_batch_contract_errors_are_clear():
    model = module()
    model.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    model.configure_model()
    good = {"input_ids": torch.randint(0, VOCAB, (2, SEQ)), "labels": torch.randint(0, VOCAB, (2, SEQ))}
    model.check_batch(good, ("input_ids", "labels"))
    with pytest.raises(KeyError, match="missing \\['labels'\\]"):
        model.check_batch({"input_ids": good["input_ids"]}, ("input_ids", "labels"))
    with pytest.raises(ValueError, match="vocab_size is 128: was the data encoded with another tokenizer"):
        model.check_batch({**good, "input_ids": good["input_ids"] + VOCAB}, ("input_ids", "labels"))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        model.check_batch({k: v.repeat(1, 2) for k, v in good.items()}, ("input_ids", "labels"))


def test_throughput_meter_counts_tokens_per_second_and_pauses_for_validation(monkeypatch):
    from llama2_lit.stages import throughput
    from llama2_lit.stages.throughput import PeakFlops, ThroughputMeter

    clock = iter([100.0, 102.0, 110.0, 114.0, 114.0])  # start, pause, resume, compute, restart
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter(flops_per_token=1e6, peak=PeakFlops(1e10, "test"), world_size=2)
    meter.start()
    meter.update(1000)
    meter.pause()    # 8 s of validation are not training time
    meter.resume()
    meter.update(1000)
    rates = meter.compute()  # 2 ranks x 2000 tokens in 14 - 8 = 6 s
    assert rates["tokens_per_s"] == pytest.approx(4000 / 6)
    assert rates["mfu"] == pytest.approx(4000 / 6 * 1e6 / (1e10 * 2))


def test_cpu_peak_is_the_best_ever_measured_on_this_machine(tmp_path, monkeypatch) -> None:
    """A peak measured while the CPU is busy would overstate MFU: the cache keeps the best."""
    from llama2_lit.stages import throughput

    monkeypatch.setattr(throughput, "PEAK_CACHE", tmp_path / "peak.json")
    assert throughput._remember_peak("cpu|2|2|bf16", 8e11) == 8e11
    assert throughput._remember_peak("cpu|2|2|bf16", 2e11) == 8e11  # a slow (busy) measurement loses
    assert throughput._remember_peak("cpu|2|2|fp32", 1e11) == 1e11  # per dtype
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda *a, **k: 1.0)  # a very busy machine
    key = f"{throughput.platform.processor() or throughput.platform.machine()}|{throughput.os.cpu_count()}|" \
          f"{throughput.torch.get_num_threads()}|bf16|{throughput.CPU_PEAK_MATMUL_SIZE}"
    throughput._remember_peak(key, 5e11)
    peak = throughput.peak_flops(throughput.torch.device("cpu"), bf16=True)
    assert peak.flops == 5e11 and "best ever on this machine" in peak.source
    (tmp_path / "peak.json").write_text("not json")
    assert throughput._remember_peak("cpu|2|2|bf16", 3e11) == 3e11  # a broken cache is ignored, then rewritten
