"""Bits-per-byte and perplexity of text: the paper's language-modelling measure (Pile-test: 7B 0.746, 67B 0.662).

Input: text files (txt, jsonl, parquet), or one prepared dataset directory, whose val split is scored as stored.

Each document is scored on its own, bos first (as training sees documents), in rolling windows of the context
length (`windows.py`). Bits per byte divides the summed negative log-likelihood in bits by the document's UTF-8
bytes, so it compares across tokenizers; nats per token and perplexity depend on the tokenizer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dsjax.data import documents, prepare, records
from dsjax.errors import DataError
from dsjax.eval.scoring import Scorer
from dsjax.eval.windows import rolling_windows


def read_texts(specs: Sequence[str], text_field: str = "text", stream=None) -> tuple[list[str], dict]:
    """Documents of .txt/.jsonl/.parquet files, directories or globs; bad ones skipped and counted."""
    stream = stream or sys.stderr
    skipped = documents.Skipped()
    texts = [doc.text for doc in documents.read_documents(documents.expand_inputs(specs), text_field, skipped)]
    skipped.report(stream)
    if not texts:
        raise DataError(f"bpb:{','.join(specs)} holds no usable document.")
    return texts, {reason: n for reason, n in skipped.to_json().items() if n}


def is_prepared(spec: str) -> bool:
    """A bpb argument naming one prepared dataset directory (python -m dsjax.data.prepare), not text files."""
    return "," not in spec and (Path(spec).expanduser() / prepare.MANIFEST).is_file()


def read_prepared(directory, tokenizer, split: str = "val") -> tuple[list, int]:
    """The token ids of a prepared text dataset's split (each record bos, text, eos) and its UTF-8 bytes."""
    directory = Path(directory).expanduser()
    manifest = prepare.read_manifest(directory)
    data_format = manifest.get("data_format", "text")
    if data_format != "text":
        raise DataError(f"bpb:{directory} holds {data_format} records; bits-per-byte scores text datasets.")
    if manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        raise DataError(f"bpb:{directory} was prepared with another tokenizer than the model's.")
    stats = manifest["splits"][split]
    if not stats["documents"]:
        raise DataError(f"bpb:{directory} has no {split} documents.")
    reader = records.DocumentReader([[directory / shard for shard in stats["shards"]]],
                                    np.dtype(manifest["token_dtype"]))
    try:
        docs = reader.read([(0, i) for i in range(reader.num_records(0))])
    finally:
        reader.close()
    return docs, stats["bytes"]


def bits_per_byte(scorer: Scorer, tokenizer, texts: Sequence[str], *, window: int | None = None,
                  stride: int | None = None, progress=None) -> dict:
    """Summed NLL of every token of every text over rolling windows; bits/byte, nats/token, perplexity."""
    docs = [[tokenizer.bos_id] + list(ids) for ids in tokenizer.encode_batch(list(texts))]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return score_documents(scorer, docs, n_bytes, window=window, stride=stride, progress=progress)


def score_documents(scorer: Scorer, docs: Sequence, n_bytes: int, *, window: int | None = None,
                    stride: int | None = None, progress=None) -> dict:
    """Every token of every document after its first, scored over rolling windows, against `n_bytes` of text. A
    prepared split's documents end in eos, which is scored too, as the trainer's held-out bits-per-byte does."""
    window = window or scorer.max_len
    if not 1 <= window <= scorer.max_len:
        raise DataError(f"--window={window} must be between 1 and the model's context, {scorer.max_len}.")
    if stride is not None and not 1 <= stride <= window:
        raise DataError(f"--stride={stride} must be between 1 and the window, {window}.")
    sequences, n_scored = [], []
    for ids in docs:
        for seq, n in rolling_windows(list(ids), window, stride):
            sequences.append(seq)
            n_scored.append(n)
    scored = scorer.score(sequences, n_scored, progress)
    nll = -sum(s.logprob for s in scored)
    tokens = sum(s.tokens for s in scored)
    return {
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "nats_per_token": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": len(docs),
        "windows": len(sequences),
    }
