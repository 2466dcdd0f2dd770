"""A stage that owns several models: one trainable, one frozen (as PPO's policy and reference).

Both are built by ``llama2_lit.stages.models.build_model`` from their own sources; only the
trainable one is optimised and clipped; the checkpoint keeps one config per model and
``load_model(path, model=name)`` reads either back; a resume rebuilds both from the checkpoint.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_stages import SEQ, TINY, VOCAB, WindowsData, trainer

from llama2_lit.checkpoints import CheckpointError, load_model
from llama2_lit.stages import PretrainModule
from llama2_lit.stages.models import ModelSource


class WithFrozenTwin(PretrainModule):
    """Pretraining loss on ``model`` plus a KL-like pull toward a frozen ``reference`` of another init."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference = None

    def model_sources(self) -> dict[str, ModelSource]:
        reference = ModelSource(preset="nano", config_overrides={**TINY, "init_std": 0.05}, lm_head=True,
                                scalar_head=True, trainable=False)
        return {**super().model_sources(), "reference": reference}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad():
            reference = self.reference(batch["input_ids"]).log_softmax(-1)
        policy = self.model(batch["input_ids"]).log_softmax(-1)
        return loss + 0.1 * (policy.exp() * (policy - reference)).sum(-1).mean()


def test_a_stage_with_a_frozen_second_model_builds_trains_checkpoints_and_reloads(tmp_path):
    L.seed_everything(0)
    stage = WithFrozenTwin(preset="nano", config_overrides=TINY, lr=3e-3, warmup_steps=1, total_steps=6,
                           peak_flops=1e11)
    trainer(tmp_path, 3, every=3).fit(stage, WindowsData())
    assert set(stage.stage_models()) == {"model", "reference"}
    assert not stage.reference.training and not any(p.requires_grad for p in stage.reference.parameters())
    optimised = {id(p) for group in stage.optimizers().param_groups for p in group["params"]}
    assert optimised == {id(p) for p in stage.model.parameters()}
    assert {id(p) for p in stage.trainable_parameters()} == optimised
    assert stage.tokens_seen == 3 * 4 * SEQ

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["model_configs"]["model"] == saved["model_config"] == stage.model.config.to_dict()
    assert saved["model_configs"]["reference"]["init_std"] == 0.05

    main = load_model(ckpt)
    reference = load_model(ckpt, model="reference", scalar_head=True)
    for loaded, built in ((main, stage.model), (reference, stage.reference)):
        for (name, a), b in zip(built.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="no model 'value' in the checkpoint \\(its models: \\['model', 'reference'\\]"):
        load_model(ckpt, model="value")

    # The frozen model did not move; the trained one did (fresh build from the same sources and seed).
    L.seed_everything(0)
    fresh = WithFrozenTwin(preset="nano", config_overrides=TINY)
    fresh.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    fresh.configure_model()
    assert all(torch.equal(a, b) for a, b in zip(fresh.reference.state_dict().values(),
                                                 stage.reference.state_dict().values()))
    assert not torch.equal(fresh.model.layers[0].attention.wq.weight, stage.model.layers[0].attention.wq.weight)

    # Resuming rebuilds both models from the checkpoint's configs and continues the run.
    resumed = WithFrozenTwin(preset="nano", config_overrides=TINY, lr=3e-3, warmup_steps=1, total_steps=6,
                             peak_flops=1e11)
    resumed.restore_weights_from_checkpoint(main.config, saved["model_configs"])
    trainer(tmp_path, 6, every=3).fit(resumed, WindowsData(), ckpt_path=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(resumed.reference.state_dict().values(),
                                                 stage.reference.state_dict().values()))
    assert resumed.global_step == 6 and resumed.tokens_seen == 6 * 4 * SEQ
    assert resumed.reference.config.init_std == 0.05 and resumed.model.config.vocab_size == VOCAB
