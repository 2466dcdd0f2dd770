"""A Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) that encodes exactly
like our SentencePiece model."""

from __future__ import annotations

import json
from pathlib import Path

from llama2_lit.checkpoints.common import _copy_tokenizer


def write_hf_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, *, model_max_length: int = 4096) -> None:
    """``tokenizer.model`` + ``tokenizer.json`` + ``tokenizer_config.json`` that encode exactly like ours.

    Why a ``tokenizer.json``: given only ``tokenizer.model``, transformers 5 builds its
    ``LlamaTokenizer`` with BPE merges ranked by piece *id* and a ``Metaspace`` pre-tokenizer that
    skips the dummy prefix when the text starts with a space. Both differ from SentencePiece on
    runs of spaces (e.g. "a  b", "  x"): a third of random whitespace-heavy strings encode
    differently. Here the merges are ranked by piece *score*, as SentencePiece's BPE merges, and
    the dummy prefix is prepended by the normalizer (the "legacy" Llama behaviour, applied to
    every chunk between special tokens, as Meta encodes each chunk separately). BOS is added,
    EOS is not (Meta's ``encode(bos=True, eos=False)``). ``PreTrainedTokenizerFast`` loads the
    file as is in transformers 4 and 5.

    One difference remains by design: HF matches the special tokens' text (``"<s>"``) inside a
    string, SentencePiece never does.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(tokenizer_path, out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    bpe = models.BPE(vocab=vocab, merges=_merges_by_score(pieces, vocab), unk_token=sp.id_to_piece(sp.unk_id()),
                     fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    special = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tokenizer.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    bos = sp.id_to_piece(sp.bos_id())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": sp.id_to_piece(sp.eos_id()), "unk_token": sp.id_to_piece(sp.unk_id()),
        "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length, "padding_side": "left",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _merges_by_score(pieces: list[tuple[str, float]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every ``(left, right)`` pair whose concatenation is a piece, best piece score first."""
    merges = []
    for piece, score in pieces:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((score, len(left), len(right), vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], -m[1], -m[2], m[3], m[4]))
    return [(m[5], m[6]) for m in merges]
