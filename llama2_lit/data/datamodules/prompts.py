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
        max_prompt_len: longest prompt in tokens (earliest exchanges are dropped to fit; leave
            room for the response within the model's context).
        drop_last: drop each epoch's last, smaller training batch, so that every PPO iteration
            is a whole batch (the paper's 512 prompts) with the same number of optimizer steps:
            PPO counts its iterations, seeds its rollouts and names its checkpoints by them.
        **records: the options of every record DataModule (``train_weights``, ``val_files``,
            ``val_fraction``, ``batch_size``, ``val_batch_size``, ``skip_too_long``, ``seed``,
            ``num_workers``; see ``_RecordsDataModule``).
    """

    kind = "prompts"

    def __init__(self, tokenizer_path: str, train_files: list[str], max_prompt_len: int = 256,
                 drop_last: bool = True, **records: Any) -> None:
        super().__init__(tokenizer_path, train_files, **records)
        self.max_prompt_len = max_prompt_len
        self.drop_last = drop_last

    def encode(self, record: dict[str, Any]) -> dict[str, Any]:
        """One ``prompts`` record: prompt ids, safety tag, raw messages and metadata."""
        ids = encode_prompt(self.tokenizer, record["messages"], max_len=self.max_prompt_len)  # type: ignore[arg-type]
        return {"input_ids": list(ids), "is_safety": bool(record.get("is_safety", False)),
                "messages": record["messages"], "meta": record.get("meta") or {}}

    def collate(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return collate_prompts
