"""LightningDataModules for every stage: pretraining text, SFT dialogs, preference pairs, RL prompts.

Data flows one way: record files (``llama2_lit.data.records``, validated there) -> token ids
(``llama2_lit.tokenizer`` and the chat format of ``llama2_lit.chat``) -> the batches below.

Batch formats (dicts of tensors; the contract every stage module reads):

- ``PretrainDataModule`` and ``SFTDataModule``: ``input_ids`` (B, T) long; ``labels`` (B, T) long,
  already shifted: ``labels[b, t]`` is the target of the logits at position ``t``, ``-100`` means
  no loss. With document masks (pretraining ``document_mask=True``, SFT ``packing=True``) also
  ``attention_mask`` (B, T, T) bool, True where query ``t`` may attend key ``s`` (block-diagonal
  and causal), and ``position_ids`` (B, T) long, restarting at 0 at each document. Without them,
  plain causal attention is right: rows are either full or right-padded, and causal attention
  never looks right, so a padding mask would change nothing (and would cost SDPA's fast path).
- ``PreferenceDataModule``: ``chosen_input_ids``, ``chosen_attention_mask``,
  ``rejected_input_ids``, ``rejected_attention_mask`` (B, T) long, right-padded to one common T;
  ``rating`` (B,) long, index into ``records.RATINGS`` (-1 when unknown, e.g. HH-RLHF: margin 0);
  ``chosen_safe``, ``rejected_safe`` (B,) long (1 safe, 0 unsafe, -1 unknown).
- ``PromptsDataModule``: ``input_ids``, ``attention_mask`` (B, T) long, LEFT-padded (every prompt
  ends at the last column, ready to generate); ``is_safety`` (B,) bool; ``messages`` and ``meta``
  as python lists (one entry per row, for the oracle judge).

Padding positions hold token id 0 (Llama 2 has no pad id): they are never targets (-100), and no
real token attends to them.

Every train loader is a ``ResumableDataLoader``: the order depends only on ``seed`` and the
epoch, and its position is saved in Lightning checkpoints, so a resumed run sees exactly the
batches the uninterrupted run would have seen (``llama2_lit/data/loader.py``).

One module per stage (``pretrain``, ``sft``, ``preference``, ``prompts``) on what they share
(``common``); every public name is importable from here, as the configs' ``class_path`` does.
"""

from llama2_lit.config import IGNORE_INDEX
from llama2_lit.data.datamodules.common import (
    PAD_TOKEN, ListDataset, best_fit_packing, dialog_labels, document_attention, document_positions,
    in_validation_split, mix_sources,
)
from llama2_lit.data.datamodules.preference import PreferenceCollate, PreferenceDataModule, drop_exchanges
from llama2_lit.data.datamodules.pretrain import (
    PackedTokenDataset, PretrainCache, PretrainCollate, PretrainDataModule, build_pretrain_cache, default_cache_dir,
    read_text_documents,
)
from llama2_lit.data.datamodules.prompts import PromptsDataModule, collate_prompts
from llama2_lit.data.datamodules.sft import SFTCollate, SFTDataModule
from llama2_lit.files import file_sha256

__all__ = [
    "IGNORE_INDEX", "PAD_TOKEN", "ListDataset", "PackedTokenDataset", "PreferenceCollate", "PreferenceDataModule",
    "PretrainCache", "PretrainCollate", "PretrainDataModule", "PromptsDataModule", "SFTCollate", "SFTDataModule",
    "best_fit_packing", "build_pretrain_cache", "collate_prompts", "default_cache_dir", "dialog_labels",
    "document_attention", "document_positions", "drop_exchanges", "file_sha256", "in_validation_split",
    "mix_sources", "read_text_documents",
]
