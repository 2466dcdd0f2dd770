"""bf16 mixed precision on CPUs: the request resolves by hardware, the fallback can be forced, and a
nano model learns as well in bf16-mixed as in fp32, with fp32 weights throughout."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from llama2_lit.stages import PretrainModule
from llama2_lit.stages import precision as precision_module
from llama2_lit.stages.precision import NO_CPU_BF16_ENV, cpu_has_native_bf16, resolve_precision

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bf16_mixed_resolves_by_the_cpus_bf16_units(monkeypatch):
    monkeypatch.delenv(NO_CPU_BF16_ENV, raising=False)
    for flags, expected in (({"avx512_bf16": True}, "bf16-mixed"), ({"amx_bf16": True}, "bf16-mixed"),
                            ({"avx512_bf16": False, "avx2": True}, "32-true")):
        monkeypatch.setattr(precision_module.torch.cpu, "get_capabilities", lambda flags=flags: flags)
        precision, note = resolve_precision("bf16-mixed", "cpu")
        assert precision == expected
        assert (note is None) == (expected == "bf16-mixed")
    assert "no bf16 matrix units" in note
    # Only bf16-mixed on a CPU is ever changed.
    assert resolve_precision("32-true", "cpu") == ("32-true", None)
    assert resolve_precision("bf16-mixed", "gpu") == ("bf16-mixed", None)
    assert resolve_precision("bf16-true", "cpu") == ("bf16-true", None)


def test_the_fallback_is_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv(NO_CPU_BF16_ENV, "1")
    assert not cpu_has_native_bf16()
    precision, note = resolve_precision("bf16-mixed", "cpu")
    assert precision == "32-true"
    assert note == f"note: trainer.precision bf16-mixed -> 32-true ({NO_CPU_BF16_ENV} is set)"
    monkeypatch.setenv(NO_CPU_BF16_ENV, "0")
    assert resolve_precision("bf16-mixed", "cpu")[0] == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")


def test_the_cli_trains_the_bf16_config_in_fp32_when_the_fallback_is_forced(tmp_path, monkeypatch, capsys):
    from llama2_lit.stages.cli import lightning_main
    from llama2_lit.stages.toy_world import ensure_toy_assets

    monkeypatch.setenv(NO_CPU_BF16_ENV, "1")
    monkeypatch.chdir(REPO_ROOT)
    ensure_toy_assets()
    config = yaml.safe_load((REPO_ROOT / "configs/nano/pretrain.yaml").read_text())
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert lightning_main(["fit", "--config", "configs/nano/pretrain.yaml", "--trainer.max_steps", "2",
                           "--model.init_args.warmup_steps", "1", "--trainer.limit_val_batches", "0",
                           "--checkpoint.every_n_train_steps", "2", "--run.dir", str(tmp_path), "--run.wandb", "false",
                           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]) == 0
    out = capsys.readouterr().out
    assert "trainer.precision bf16-mixed -> 32-true" in out
    assert "precision 32-true; MFU is against" in out and "measured fp32" in out
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["precision"] == "32-true"


# ------------------------------------------------------------------------------------ quality
class AutocastRecordingPretrain(PretrainModule):
    """Pretraining that records whether its training step ran under CPU bf16 autocast."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.autocast: set[tuple[bool, torch.dtype]] = set()

    def training_step(self, batch, batch_idx):
        self.autocast.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return super().training_step(batch, batch_idx)


def train_nano(precision: str, steps: int) -> tuple[list[float], AutocastRecordingPretrain]:
    from test_stages import Recorder, WindowsData

    L.seed_everything(0)
    model = AutocastRecordingPretrain(preset="nano", config_overrides={"vocab_size": 128, "max_seq_len": 16},
                                      lr=3e-3, warmup_steps=5, peak_flops=1e11)
    recorder = Recorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, WindowsData(n_train=160, batch_size=8))
    return [float(recorder.losses[step]) for step in sorted(recorder.losses)], model


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no bf16 matrix units")
def test_nano_loss_falls_as_far_in_bf16_mixed_as_in_fp32():
    steps = 40
    fp32, model32 = train_nano("32-true", steps)
    bf16, model16 = train_nano("bf16-mixed", steps)
    assert not any(enabled for enabled, _ in model32.autocast)
    assert model16.autocast == {(True, torch.bfloat16)}  # the step really ran under bf16 autocast
    assert abs(fp32[0] - bf16[0]) < 0.05  # same weights, same batch; bf16 matmuls
    fell_fp32, fell_bf16 = fp32[0] - min(fp32[-5:]), bf16[0] - min(bf16[-5:])
    assert fell_fp32 > 1.0, fp32
    assert fell_bf16 == pytest.approx(fell_fp32, rel=0.15), (fp32[-5:], bf16[-5:])
    # fp32 master weights (and so fp32 checkpoints) under bf16-mixed.
    assert {p.dtype for p in model16.model.parameters()} == {torch.float32}
