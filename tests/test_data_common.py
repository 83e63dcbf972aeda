"""Shared helpers for the data tests (no tests here): small real text, a small tokenizer, small prepared datasets."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from dsjax.data import corpus, prepare, records
from dsjax.data.tokenizer import SPM_FILE, train_sentencepiece


@functools.lru_cache(maxsize=None)
def stdlib_texts(count: int = 80) -> tuple[str, ...]:
    """The first `count` non-empty files of the built-in corpus, a deterministic sample of real code."""
    texts = []
    for path in corpus.stdlib_files():
        text = path.read_text(encoding="utf-8")
        if text.strip():
            texts.append(text)
        if len(texts) == count:
            break
    return tuple(texts)


def train_small_tokenizer(directory: Path, vocab_size: int = 1000, count: int = 40):
    return train_sentencepiece(stdlib_texts(count), vocab_size, directory / SPM_FILE, num_threads=2)


def train_byte_level_bpe(directory: Path, vocab_size: int = 900) -> Path:
    """A byte-level BPE tokenizer.json made with HF `tokenizers` itself, the kind DeepSeek released."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from dsjax.data import tokenizer as tk

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[tk.BOS, tk.EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(stdlib_texts(20), trainer)
    path = Path(directory) / tk.HF_FILE
    tok.save(str(path))
    return path


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def read_split(dataset_dir: Path, split: str) -> list[np.ndarray]:
    """Every record of a prepared split, in stored order, read with array_record directly (not the loader)."""
    manifest = prepare.read_manifest(dataset_dir)
    dtype = np.dtype(manifest["token_dtype"])
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(dataset_dir / shard))
        docs.extend(records.decode_record(r, dtype) for r in reader.read_all())
        reader.close()
    return docs


def pair_codes(docs, vocab: int) -> np.ndarray:
    """Sorted codes token * vocab + next token of every (token, next) pair of the documents: the packing oracle."""
    codes = [d[:-1].astype(np.int64) * vocab + d[1:] for d in docs if len(d) > 1]
    return np.sort(np.concatenate(codes))


def batch_pair_codes(batches, vocab: int) -> np.ndarray:
    codes = [b["tokens"].astype(np.int64)[b["loss_weights"] > 0] * vocab + b["targets"][b["loss_weights"] > 0]
             for b in batches]
    return np.sort(np.concatenate(codes))
