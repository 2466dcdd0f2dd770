"""SentencePiece tokenizer with Llama 2's conventions (spec section 2).

Meta's wrapper: ``encode(s, bos, eos) = [BOS]*bos + sp.encode(s) + [EOS]*eos``; unk/bos/eos are
0/1/2 and there is **no pad id** (``pad_id == -1``). Padding is therefore never a token value in
this project: batches carry masks or lengths.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    """A loaded SentencePiece model (Meta's ``tokenizer.model`` or one we trained)."""

    def __init__(self, model_path: str | Path) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for Llama 2: there is no pad token

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``text``; ``bos``/``eos`` are explicit, as in Meta's wrapper."""
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)
