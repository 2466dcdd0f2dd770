"""Prompts to sample responses for: rejection sampling, PPO and evaluation (paper section 3.2.3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llama2_lit.chat import encode_prompt
from llama2_lit.data.datamodules.common import PAD_TOKEN, _RecordsDataModule
from llama2_lit.tokenizer import pad_batch


def collate_prompts(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Left-pads prompt ids; carries the raw dialogs and their metadata as python lists."""
    input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], side="left", pad_value=PAD_TOKEN)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "is_safety": torch.tensor([e["is_safety"] for e in examples], dtype=torch.bool),
        "messages": [e["messages"] for e in examples],
        "meta": [e["meta"] for e in examples],
    }


class PromptsDataModule(_RecordsDataModule):
    """Prompts to sample responses for (rejection sampling and PPO, paper section 3.2.3).

    Each prompt dialog (ending with a user turn) is encoded by ``llama2_lit.chat.encode_prompt``,
    ready for generation, and left-padded so that every row ends at the last column. The safety
    tag (PPO scores safety prompts with the safety RM) and the raw messages and metadata (for the
    oracle judge) travel with the batch.

    Args:
        tokenizer_path: SentencePiece model file.
        train_files: files of ``prompts`` records.
        train_weights: mixture weights, one per train file (see ``SFTDataModule``).
        val_files: held-out ``prompts`` files. Without them, ``val_fraction`` of the training
            prompts (chosen by a hash of the record) is held out.
        val_fraction: fraction of prompts held out when no ``val_files`` are given.
        max_prompt_len: longest prompt in tokens (earliest exchanges are dropped to fit; leave
            room for the response within the model's context).
        batch_size: prompts per batch (per device).
        val_batch_size: prompts per validation batch; default ``batch_size``.
        skip_too_long: skip (and count) prompts that cannot fit ``max_prompt_len``; False: error.
        seed: seed of the mixture and the shuffling (epoch ``e`` uses ``seed + e``).
        num_workers: DataLoader worker processes.
    """

    kind = "prompts"

    def __init__(
        self,
        tokenizer_path: str,
        train_files: list[str],
        train_weights: list[float] | None = None,
        val_files: list[str] | None = None,
        val_fraction: float = 0.0,
        max_prompt_len: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        skip_too_long: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(tokenizer_path=tokenizer_path, train_files=train_files, train_weights=train_weights,
                         val_files=val_files, val_fraction=val_fraction, skip_too_long=skip_too_long,
                         batch_size=batch_size, val_batch_size=val_batch_size, seed=seed, num_workers=num_workers)
        self.save_hyperparameters()
        self.max_prompt_len = max_prompt_len

    def encode(self, record: dict[str, Any]) -> dict[str, Any]:
        """One ``prompts`` record: prompt ids, safety tag, raw messages and metadata."""
        ids = encode_prompt(self.tokenizer, record["messages"], max_len=self.max_prompt_len)  # type: ignore[arg-type]
        return {"input_ids": list(ids), "is_safety": bool(record.get("is_safety", False)),
                "messages": record["messages"], "meta": record.get("meta") or {}}

    def collate(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return collate_prompts
