"""Our sentencepiece BPE `tokenizer.model` as an equivalent Hugging Face `tokenizer.json`.

Why: export-hf publishes the tokenizer with the weights, and transformers (AutoTokenizer, apply_chat_template,
generate) reads only tokenizer.json. The result gives the ids of `SentencePieceTokenizer.encode` on every input;
tests/test_export_sentencepiece.py checks that against sentencepiece itself.

How each part of a model trained with dsjax's recipe (data/tokenizer.py, SPM_RECIPE) carries over:

- identity normalization, no dummy prefix, no whitespace trimming: no normalizer, nothing prepended.
- spaces: sentencepiece writes a space as U+2581 in its pieces. The HF vocab spells it as a real space instead, so
  the input needs no rewriting, and a literal U+2581 in the text (which sentencepiece cannot tell from a space, and
  which dsjax spells as its three byte pieces) is a character outside the vocab that byte fallback spells the same.
- BPE merges: sentencepiece joins the adjacent pair whose concatenation is the highest-scoring piece, the leftmost
  one on a tie; any two pieces that concatenate to a piece join, whichever way it was learned. So every split of a
  piece into two pieces is a merge, ranked by the piece's score; HF also takes the leftmost on a tie of one merge.
  The splits of one piece get consecutive ranks (longer left part first), so the two agree except, possibly, where
  two different splits of one piece are joinable at the same moment: sentencepiece then takes the leftmost, HF the
  lower-ranked. `_verify` encodes every piece and every side-by-side case ("a" "b" "c" with a+b = b+c a piece)
  with both and refuses on a difference; none occurs on the tokenizers dsjax trains (the tests fuzz the rest).
- split_digits: no piece holds a digit beside another character, so digits stay single with these merges alone.
- byte_fallback: BPE byte_fallback over the `<0xXX>` pieces (a character outside the vocab becomes its UTF-8
  bytes; byte pieces never merge), and the ByteFallback decoder.
- user-defined symbols ("\\n"): never merged in sentencepiece, so added tokens (non-special: always matched, even
  where special-token text is read as text).
- control pieces (pad, bos, eos): special added tokens, so the chat template's bos/eos text becomes their ids in
  transformers; a post-processor prepends bos when special tokens are asked for, as dsjax.generate does.
- the padded vocab: tokenizer.json holds the tokenizer's pieces only; the ids past them, which only the model has,
  are suppressed by the generation_config.json that dsjax/convert.py writes beside it.

A model outside that recipe (another normalization, a dummy prefix, unigram, no byte fallback, unused pieces) is
refused with one sentence rather than converted into a tokenizer that would give other ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, processors

from dsjax.errors import DataError

_META = "\u2581"  # sentencepiece's spelling of a space inside pieces


def convert(model_file: str | Path) -> tokenizers.Tokenizer:
    """The Hugging Face tokenizer equivalent to the sentencepiece BPE model in `model_file`."""
    from sentencepiece import sentencepiece_model_pb2

    path = Path(model_file)
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise DataError(f"{path} is not a sentencepiece model ({e}).") from None
    if not proto.pieces:
        raise DataError(f"{path} is not a sentencepiece model (it has no pieces).")
    _check_recipe(path, proto)

    Type = sentencepiece_model_pb2.ModelProto.SentencePiece
    vocab: dict[str, int] = {}
    normal: dict[str, float] = {}  # piece (space spelled as a space) -> score
    controls, user_defined, unk = [], [], None
    for i, piece in enumerate(proto.pieces):
        name = piece.piece
        if piece.type == Type.NORMAL:
            name = name.replace(_META, " ")
            normal[name] = piece.score
        elif piece.type == Type.USER_DEFINED:
            user_defined.append(name)
        elif piece.type == Type.CONTROL:
            controls.append(name)
        elif piece.type == Type.UNKNOWN:
            unk = name
        elif piece.type == Type.UNUSED:
            raise DataError(f"{path} has unused piece {name!r}; sentencepiece re-splits those, which a Hugging Face "
                            "BPE cannot do.")
        if name in vocab:
            raise DataError(f"{path} has two pieces spelled {name!r} once spaces are spelled as spaces.")
        vocab[name] = i
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise DataError(f"{path} lacks byte piece {missing[0]} (and {len(missing) - 1} more) of its byte fallback.")
    if " " not in normal:
        raise DataError(f"{path} has no piece for a space, so sentencepiece would spell spaces as the bytes of "
                        "U+2581; retrain it on text with spaces.")
    for name in user_defined:
        if _META in name or " " in name:
            raise DataError(f"{path} has user-defined symbol {name!r} with a space in it; only space-free "
                            "symbols (such as the recipe's newline) convert exactly.")

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges(path, normal), unk_token=unk,
                                          byte_fallback=True, fuse_unk=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in controls])
    tok.add_tokens([AddedToken(name, special=False, normalized=False) for name in user_defined])
    bos = proto.trainer_spec.bos_piece
    if bos in controls:
        tok.post_processor = processors.TemplateProcessing(
            single=[bos, "$A"], pair=[bos, "$A", bos, "$B"], special_tokens=[(bos, vocab[bos])])
    _verify(path, tok, normal)
    return tok


def serialize(tok: tokenizers.Tokenizer) -> bytes:
    """A tokenizer.json file's content (readable: non-ASCII pieces unescaped)."""
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=2).encode()


def _verify(path: Path, tok: tokenizers.Tokenizer, normal: dict[str, float]) -> None:
    """Encodes every piece, and every string where two splits of one piece are joinable side by side (where the
    order of one piece's merges would show first), with both tokenizers; refuses on the first difference."""
    from dsjax.data.tokenizer import SentencePieceTokenizer

    probes = list(normal)
    for piece in normal:
        n = len(piece)
        for k in range(1, n):  # piece = a + b = b + c, all three pieces: "a b c" has both splits side by side
            a, b, c = piece[:k], piece[k:], piece[n - k:]
            if piece[: n - k] == b and a in normal and b in normal and c in normal:
                probes.append(piece + c)
    ours = SentencePieceTokenizer(path).encode_batch(probes)
    tok.encode_special_tokens = True
    try:
        theirs = [e.ids for e in tok.encode_batch(probes, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = False
    for text, want, got in zip(probes, ours, theirs):
        if want != got:
            raise DataError(f"{path} cannot be converted exactly: sentencepiece encodes {text!r} as {want} but the "
                            f"Hugging Face BPE built from it gives {got}.")


def _check_recipe(path: Path, proto) -> None:
    """Refuses the sentencepiece settings a Hugging Face BPE pipeline cannot reproduce id for id."""
    from sentencepiece import sentencepiece_model_pb2

    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    bpe = sentencepiece_model_pb2.TrainerSpec.ModelType.BPE
    problems = [
        (trainer.model_type != bpe, f"is a {sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} "
                                    "model, not BPE"),
        (not trainer.byte_fallback, "has no byte fallback"),
        (normalizer.precompiled_charsmap != b"" or normalizer.name not in ("identity", ""),
         f"normalizes text (rule {normalizer.name!r})"),
        (normalizer.add_dummy_prefix, "adds a dummy prefix space"),
        (normalizer.remove_extra_whitespaces, "removes extra whitespace"),
        (not normalizer.escape_whitespaces, "does not escape whitespace"),
    ]
    for failed, what in problems:
        if failed:
            raise DataError(f"{path} {what}; only models trained with dsjax's recipe (python -m dsjax.data.tokenizer "
                            "train) convert exactly to tokenizer.json.")


def _merges(path: Path, normal: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the highest-scoring piece's splits first.

    sentencepiece breaks a score tie by position, HF by rank: two pieces sharing a score could merge in another
    order, so such a model is refused (dsjax's trainer gives every piece its own score). Within one piece the
    longer left part ranks first (see the module docstring for when that order could matter).
    """
    by_score: dict[float, str] = {}
    merges = []
    for piece, score in sorted(normal.items(), key=lambda kv: -kv[1]):
        if len(piece) < 2:
            continue
        if score in by_score:
            raise DataError(f"{path} gives pieces {by_score[score]!r} and {piece!r} the same score {score}, so "
                            "sentencepiece's merge order between them depends on position; retrain it.")
        by_score[score] = piece
        stray = [c for c in piece if c not in normal]
        if stray:  # sentencepiece can join an unknown character; HF has made it bytes by then
            raise DataError(f"{path} has piece {piece!r} with the character {stray[0]!r}, which is not itself a "
                            "piece.")
        merges += [(piece[:k], piece[k:]) for k in range(len(piece) - 1, 0, -1)
                   if piece[:k] in normal and piece[k:] in normal]
    return merges
