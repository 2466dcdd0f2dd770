"""Preference pairs for the reward models (paper section 3.2.2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llama2_lit.chat import EncodedDialog, encode_dialog
from llama2_lit.data.datamodules.common import PAD_TOKEN, _RecordsDataModule
from llama2_lit.data.records import rating_index
from llama2_lit.tokenizer import pad_batch


def _safety_label(value: Any) -> int:
    return -1 if value is None else int(bool(value))


def drop_exchanges(prompt: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """The prompt without its first ``count`` (user, assistant) exchanges, the system message kept
    (``encode_dialog`` merges it into the new first user turn, as its own long-dialog policy does)."""
    system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    return system + prompt[len(system) + 2 * count:]


class PreferenceCollate:
    """Right-pads chosen and rejected sequences to one common length."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        width = max(max(len(e["chosen"]), len(e["rejected"])) for e in examples)
        chosen, chosen_mask = pad_batch([e["chosen"] for e in examples], side="right", pad_value=PAD_TOKEN,
                                        pad_to=width)
        rejected, rejected_mask = pad_batch([e["rejected"] for e in examples], side="right", pad_value=PAD_TOKEN,
                                            pad_to=width)
        return {
            "chosen_input_ids": chosen,
            "chosen_attention_mask": chosen_mask,
            "rejected_input_ids": rejected,
            "rejected_attention_mask": rejected_mask,
            "rating": torch.tensor([e["rating"] for e in examples], dtype=torch.long),
            "chosen_safe": torch.tensor([e["chosen_safe"] for e in examples], dtype=torch.long),
            "rejected_safe": torch.tensor([e["rejected_safe"] for e in examples], dtype=torch.long),
            **({"source": torch.tensor([e["source"] for e in examples], dtype=torch.long)}
               if all("source" in e for e in examples) else {}),
        }


class PreferenceDataModule(_RecordsDataModule):
    """Preference pairs for the reward models (paper section 3.2.2).

    Chosen and rejected are each encoded as the finished dialog ``prompt + [assistant: response]``
    by ``llama2_lit.chat.encode_dialog``, so the reward model reads exactly the chat format the
    policy writes, EOS included (its score is read at the last real token). When a pair is too
    long, both sides lose the same earliest exchanges, so both responses are judged in the same
    context.

    Args:
        tokenizer_path: SentencePiece model file.
        train_files: files of ``preference`` records.
        train_weights: mixture weights, one per train file (see ``SFTDataModule``), e.g. a 90/10
            safety/helpfulness mix for the safety RM (paper section 3.2.2).
        max_seq_len: longest dialog in tokens.
        batch_size: pairs per batch (per device); the model reads 2 x batch_size sequences.
        **records: the options of every record DataModule (``train_weights``, ``val_files``,
            ``val_fraction``, ``batch_size``, ``val_batch_size``, ``skip_too_long``, ``seed``,
            ``num_workers``; see ``_RecordsDataModule``).
    """

    kind = "preference"

    def __init__(self, tokenizer_path: str, train_files: list[str], max_seq_len: int = 512, **records: Any) -> None:
        super().__init__(tokenizer_path, train_files, **records)
        self.max_seq_len = max_seq_len

    def encode(self, record: dict[str, Any]) -> dict[str, Any]:
        """One ``preference`` record: ids of both finished dialogs, rating index, safety labels."""

        def finished(prompt: list[dict[str, str]], response: str) -> EncodedDialog:
            messages = [*prompt, {"role": "assistant", "content": response}]
            return encode_dialog(self.tokenizer, messages, loss_on="last_assistant",  # type: ignore[arg-type]
                                 max_len=self.max_seq_len)

        chosen = finished(record["prompt"], record["chosen"])
        rejected = finished(record["prompt"], record["rejected"])
        if chosen.dropped_exchanges != rejected.dropped_exchanges:
            prompt = drop_exchanges(record["prompt"], max(chosen.dropped_exchanges, rejected.dropped_exchanges))
            chosen, rejected = finished(prompt, record["chosen"]), finished(prompt, record["rejected"])
        return {
            "chosen": list(chosen.ids),
            "rejected": list(rejected.ids),
            "rating": rating_index(record["rating"]),
            "chosen_safe": _safety_label(record.get("chosen_safe")),
            "rejected_safe": _safety_label(record.get("rejected_safe")),
        }

    def _encode_into(self, out: list[Any], record: dict[str, Any], path: str, number: int) -> None:
        before = len(out)
        super()._encode_into(out, record, path, number)
        if len(out) > before:
            self._encoded_from.append(path)

    def _encoded_splits(self) -> tuple[list[Any], list[Any]]:
        self._encoded_from: list[str] = []
        train, val = super()._encoded_splits()
        if self.val_files:
            # A validation pair remembers its file (batch key ``source``), so metrics can be split by
            # file. The validation files are encoded last, so they are the last len(val) encoded.
            for example, path in zip(val, self._encoded_from[len(self._encoded_from) - len(val):]):
                example["source"] = self.val_files.index(path)
        return train, val

    def collate(self) -> PreferenceCollate:
        return PreferenceCollate()
