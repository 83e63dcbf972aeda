"""Tokenizers behind one interface: our sentencepiece BPE models and Hugging Face `tokenizer.json` files.

Our own models follow the paper's recipe (PAPER.md, Tokenizer): BPE with byte fallback, so no input is ever unknown;
numbers split into single digits; whitespace and newlines kept exactly, since code is a large share of the data; the
DeepSeek special tokens. DeepSeek's released byte-level BPE is a `tokenizer.json` and loads through `tokenizers`.
For both, `decode(encode(text)) == text` for any valid Unicode text, and `encode` never adds bos/eos (prepare does).

CLI: python -m dsjax.data.tokenizer train --input=FILES_DIRS_OR_GLOBS --vocab_size=N --output=DIR
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers

from dsjax.errors import DataError
from dsjax.errors import ConfigError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<pad>"
UNK = "<unk>"
SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# sentencepiece writes spaces as U+2581 and turns U+2581 back into a space on decode; we spell a literal U+2581
# in the input with its three byte-fallback pieces instead, which decode to U+2581 itself.
_META = "\u2581"

# The paper's recipe as sentencepiece trainer options (vocab_size and num_threads are added per call).
SPM_RECIPE = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    # Keep text exactly: no NFKC, no collapsing or trimming of spaces, no invented leading space.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    # Newline is its own piece, so line structure is always visible to the model.
    user_defined_symbols=["\n"],
    character_coverage=1.0,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    pad_piece=PAD,
    bos_piece=BOS,
    eos_piece=EOS,
    unk_piece=UNK,
    # Whole documents are training sentences (the default cap of 4192 bytes would drop most source files).
    max_sentence_length=1 << 30,
    minloglevel=2,
)


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """The model vocab for an n-token tokenizer: n rounded up to a multiple (the paper: 100015 -> 102400 = 25 * 4096)."""
    return -(-n // multiple) * multiple


class Tokenizer(abc.ABC):
    """encode/decode plus the facts the rest of dsjax needs: special ids, vocab size, and a fingerprint.

    The fingerprint (sha256 of the file and the special ids) lets a prepared dataset and a checkpoint prove they
    were made with the same tokenizer.
    """

    kind: str

    def __init__(self, path: Path, *, bos_id: int, eos_id: int, pad_id: int, vocab_size: int):
        self.path = path
        self.bos_id, self.eos_id, self.pad_id, self.vocab_size = bos_id, eos_id, pad_id, vocab_size
        digest = hashlib.sha256(path.read_bytes())
        digest.update(json.dumps([self.kind, bos_id, eos_id, pad_id]).encode())
        self.fingerprint = digest.hexdigest()

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of text, without bos/eos."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode over many texts (in Rust threads for Hugging Face; encoding.py spreads sentencepiece over cores)."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of ids (a list or numpy array); bos, eos and pad decode to nothing."""

    def describe(self) -> dict:
        """The JSON facts a manifest records about its tokenizer."""
        return {
            "kind": self.kind,
            "file": self.path.name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except RuntimeError as e:
            raise DataError(f"{path} is not a sentencepiece model ({e}).") from None
        sp = self._sp
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise DataError(f"sentencepiece model {path} has no bos or eos piece; train it with bos and eos ids.")
        pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
        super().__init__(path, bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=pad_id, vocab_size=sp.get_piece_size())
        meta_bytes = [sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]
        self._meta_ids = meta_bytes if all(sp.is_byte(i) for i in meta_bytes) else None

    def encode(self, text: str) -> list[int]:
        if self._meta_ids is None or _META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_META)):
            if i:
                ids.extend(self._meta_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = self._sp.encode(list(texts))
        for i, text in enumerate(texts):
            if _META in text:
                out[i] = self.encode(text)
        return out

    def decode(self, ids) -> str:
        return self._sp.decode(np.asarray(ids, dtype=np.int64).tolist())


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizer.json`; bos/eos/pad come from a `tokenizer_config.json` beside it, else DeepSeek's names.

    Special-token text inside a document is encoded as ordinary text, never as the special id, so data cannot
    forge a document boundary. pad defaults to eos, as in DeepSeek's released config.
    """

    kind = "huggingface"

    def __init__(self, path: Path):
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file.
            raise DataError(f"{path} is not a Hugging Face tokenizer.json ({e}).") from None
        self._tok.encode_special_tokens = True
        names, configured = _hf_special_names(path)
        ids = {}
        for role in ("bos", "eos", "pad"):
            name = names[role]
            ids[role] = None if name is None else self._tok.token_to_id(name)
            if role in configured and ids[role] is None:
                raise DataError(f"{path} has no token {name!r}, which tokenizer_config.json names as {role}_token.")
        if ids["bos"] is None or ids["eos"] is None:
            raise DataError(
                f"cannot tell the bos/eos tokens of {path}: it has neither {BOS!r}/{EOS!r} nor a "
                "tokenizer_config.json with bos_token and eos_token beside it."
            )
        vocab = self._tok.get_vocab(with_added_tokens=True)
        super().__init__(
            path,
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            pad_id=ids["pad"] if ids["pad"] is not None else ids["eos"],
            vocab_size=max(vocab.values()) + 1,
        )

    def token_name(self, token_id: int) -> str:
        """The token's string in tokenizer.json (what transformers' configs name special tokens by)."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=True)


def _hf_special_names(path: Path) -> tuple[dict[str, str | None], set[str]]:
    """Special token names by role, and the roles that tokenizer_config.json set (the rest are defaults)."""
    config_path = path.parent / "tokenizer_config.json"
    names: dict[str, str | None] = {"bos": BOS, "eos": EOS, "pad": None}
    configured: set[str] = set()
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{config_path} is not valid JSON ({e}).") from None
        for role in names:
            value = config.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[role] = value
                configured.add(role)
    return names, configured


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `.model` (sentencepiece) or `.json` (Hugging Face) file, or a directory holding one of them."""
    path = Path(path)
    if path.is_dir():
        for name in (SPM_FILE, HF_FILE):
            if (path / name).exists():
                return load_tokenizer(path / name)
        raise DataError(f"tokenizer directory {path} holds neither {SPM_FILE} nor {HF_FILE}.")
    if not path.exists():
        raise DataError(f"tokenizer file {path} does not exist.")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path)
    raise DataError(f"tokenizer file {path} is neither a sentencepiece .model nor a Hugging Face .json file.")


def check_vocab_fits(tokenizer_vocab_size: int, model_vocab_size: int, tokenizer_path) -> None:
    """Refuses a tokenizer whose ids would index past the model's embedding table."""
    if tokenizer_vocab_size > model_vocab_size:
        raise ConfigError(
            f"the tokenizer {tokenizer_path} has {tokenizer_vocab_size} tokens but model.vocab_size is "
            f"{model_vocab_size}: set model.vocab_size to at least {padded_vocab_size(tokenizer_vocab_size)}."
        )


def train_sentencepiece(texts: Iterable[str], vocab_size: int, output: Path, num_threads: int = 0) -> Tokenizer:
    """Trains a BPE model with the paper's recipe on whole documents and writes it to `output` (a .model file)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=num_threads or os.cpu_count() or 1,
            **SPM_RECIPE,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece cannot train a {vocab_size}-token model on this text ({e}).") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    partial.write_bytes(model.getvalue())
    os.replace(partial, output)
    return load_tokenizer(output)


def main(argv: Sequence[str] | None = None) -> None:
    from dsjax.data import documents

    parser = argparse.ArgumentParser(prog="python -m dsjax.data.tokenizer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a BPE tokenizer with the paper's recipe")
    train.add_argument("--input", nargs="+", action="extend", required=True,
                       help=".txt/.jsonl/.parquet files, directories or globs")
    train.add_argument("--vocab_size", type=int, required=True, help="tokens in all, special and byte pieces included")
    train.add_argument("--output", required=True, help=f"directory to write {SPM_FILE} into")
    train.add_argument("--text_field", default="text", help="the text field of .jsonl/.parquet records")
    train.add_argument("--num_threads", type=int, default=0, help="0: all cores")
    train.add_argument("--overwrite", action="store_true", help=f"replace an existing {SPM_FILE}")
    args = parser.parse_args(argv)
    try:
        output = Path(args.output) / SPM_FILE
        if output.exists() and not args.overwrite:
            raise DataError(f"--output={args.output} already holds {SPM_FILE}; pass --overwrite to replace it.")
        skipped = documents.Skipped()
        texts = [doc.text for doc in documents.read_documents(documents.expand_inputs(args.input),
                                                                args.text_field, skipped)]
        skipped.report(sys.stderr)
        if not texts:
            raise DataError(f"--input={','.join(args.input)} holds no usable document to train on.")
        start = time.time()
        tok = train_sentencepiece(texts, args.vocab_size, output, args.num_threads)
    except DataError as e:
        sys.exit(f"error: {e}")
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"trained a {tok.vocab_size}-token BPE tokenizer on {len(texts)} documents ({megabytes:.1f} MB) in "
          f"{time.time() - start:.1f}s -> {output} (fingerprint {tok.fingerprint[:16]})")


if __name__ == "__main__":
    main()
