"""prepare: text files -> tokenized ArrayRecord shards and a JSON manifest, which the loader reads.

    python -m dsjax.data.prepare --input=DATA_DIR --tokenizer=TOK_DIR/tokenizer.model --output=OUT_DIR \
        [--val_fraction=0.01] [--dedup=exact|none] [--text_field=text] [--overwrite]

OUT_DIR/manifest.json             documents, tokens, targets and UTF-8 bytes per split (bits-per-byte needs the
                                  bytes), the tokenizer's fingerprint, duplicates removed, what was skipped and why
OUT_DIR/tokenizer.model (.json)   a copy of the tokenizer, so the dataset carries what decodes it
OUT_DIR/train/NNNNN.array_record  one document per record: bos, its tokens, eos
OUT_DIR/train/lengths.npy         tokens per record, so a finite pass knows its length without reading the data
OUT_DIR/val/...                   the held-out split, same layout

A document goes to val by a hash of its normalized text, so the split does not depend on input order and two copies
of a text never straddle train and val. The output appears only when complete: it is written aside, then renamed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsjax.data import documents, encoding, records, staging
from dsjax.data.errors import DataError
from dsjax.data.tokenizer import Tokenizer, load_tokenizer

FORMAT = "dsjax-prepared/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DEDUP_MODES = ("none", "exact")
_BATCH_CHARS = 4 << 20  # tokenize this much text per batch (spread over the workers, encoding.py)


def normalize(text: str) -> str:
    """What exact dedup compares: NFC, LF line ends, no trailing spaces on lines, no blank space around the text."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def text_hash(text: str) -> bytes:
    return hashlib.sha256(normalize(text).encode("utf-8")).digest()


def held_out(digest: bytes, val_fraction: float) -> bool:
    """Whether a document with this text hash belongs to the validation split."""
    return int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64


def write_dataset(
    docs: Iterable[documents.Document],
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    val_fraction: float,
    dedup: str,
    skipped: documents.Skipped,
    inputs: Sequence[str],
    workers: int = 0,
    shard_bytes: int = 256 << 20,
    extra: dict | None = None,
) -> dict:
    """Tokenizes `docs` into `out_dir` (an empty directory) and writes its manifest last; returns the manifest."""
    with encoding.Encoder(tokenizer, workers) as encode:
        return _write_dataset(docs, tokenizer, encode, out_dir, val_fraction=val_fraction, dedup=dedup,
                              skipped=skipped, inputs=inputs, shard_bytes=shard_bytes, extra=extra)


def _write_dataset(docs, tokenizer, encode, out_dir, *, val_fraction, dedup, skipped, inputs, shard_bytes, extra):
    dtype = records.token_dtype(tokenizer.vocab_size)
    writers = {split: records.ShardWriter(out_dir / split, dtype, shard_bytes) for split in SPLITS}
    totals = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    seen: set[bytes] = set()
    duplicates = 0
    batch: list[tuple[str, str]] = []

    def flush():
        for (split, text), ids in zip(batch, encode([text for _, text in batch])):
            row = np.empty(len(ids) + 2, dtype=dtype)
            row[0], row[1:-1], row[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
            writers[split].write(row)
            totals[split]["documents"] += 1
            totals[split]["tokens"] += len(row)
            totals[split]["bytes"] += len(text.encode("utf-8"))
        batch.clear()

    batch_chars = 0
    for doc in docs:
        digest = text_hash(doc.text)
        if dedup == "exact":
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
        batch.append(("val" if held_out(digest, val_fraction) else "train", doc.text))
        batch_chars += len(doc.text)
        if batch_chars >= _BATCH_CHARS:
            flush()
            batch_chars = 0
    flush()
    for writer in writers.values():
        writer.close()

    if not any(t["documents"] for t in totals.values()):
        first = f", the first at {skipped.examples[0]}" if skipped.examples else ""
        raise DataError(
            f"--input={','.join(inputs)} holds no usable document ({skipped.total} skipped: "
            f"{skipped.summary() or 'nothing to read'}{first})."
        )
    _copy_tokenizer(tokenizer, out_dir)
    splits = {}
    for split in SPLITS:
        t = totals[split]
        splits[split] = {
            **t,
            # Every token but a document's first is a next-token target: the count bits-per-byte divides by.
            "targets": t["tokens"] - t["documents"],
            "shards": [f"{split}/{p.name}" for p in writers[split].shards],
            "lengths": f"{split}/lengths.npy" if t["documents"] else None,
        }
    manifest = {
        "format": FORMAT,
        "complete": True,
        "tokenizer": tokenizer.describe(),
        "token_dtype": dtype.str,
        "inputs": list(inputs),
        "val_fraction": val_fraction,
        "dedup": dedup,
        "duplicates_removed": duplicates,
        "skipped": skipped.to_json(),
        "skipped_examples": skipped.examples,
        "splits": splits,
        **(extra or {}),
    }
    partial = out_dir / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.rename(out_dir / MANIFEST)
    return manifest


def _copy_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    if (out_dir / tokenizer.path.name).resolve() != tokenizer.path.resolve():
        shutil.copyfile(tokenizer.path, out_dir / tokenizer.path.name)
    config = tokenizer.path.parent / "tokenizer_config.json"
    if tokenizer.kind == "huggingface" and config.exists():
        shutil.copyfile(config, out_dir / config.name)


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared dataset, with `dir` (its absolute path) added; refuses incomplete ones."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise DataError(
            f"{directory} is not a prepared dataset: it has no {MANIFEST} (make one with python -m dsjax.data.prepare)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}).") from None
    if manifest.get("format") != FORMAT or manifest.get("complete") is not True:
        raise DataError(f"{path} is not a complete {FORMAT} manifest; prepare {directory} again.")
    manifest["dir"] = str(directory.resolve())
    return manifest


def prepare(
    inputs: Sequence[str],
    tokenizer: str | Path,
    output: str | Path,
    *,
    val_fraction: float = 0.01,
    dedup: str = "exact",
    text_field: str = "text",
    overwrite: bool = False,
    workers: int = 0,
    shard_mb: int = 256,
    progress: bool = True,
    log=None,
) -> dict:
    """The CLI as a function: checks its arguments, tokenizes in `workers` processes (0: one per core; call it
    under `if __name__ == "__main__":`, see encoding.py), publishes `output` atomically."""
    log = log or sys.stderr
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"--val_fraction must be between 0 and 1, got {val_fraction}.")
    if dedup not in DEDUP_MODES:
        raise DataError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {dedup!r}.")
    output = Path(output)
    if not staging.is_empty_or_missing(output) and not overwrite:
        raise DataError(f"--output={output} already exists and is not empty; pass --overwrite to replace it.")
    paths = documents.expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    skipped = documents.Skipped()
    start = time.time()
    total_bytes = sum(p.stat().st_size for p in paths)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None if progress else True,
              file=log) as bar, staging.staging_dir(output) as staged:
        try:
            docs = documents.read_documents(paths, text_field, skipped, on_bytes=bar.update)
            manifest = write_dataset(docs, tok, staged, val_fraction=val_fraction, dedup=dedup, skipped=skipped,
                                     inputs=inputs, workers=workers, shard_bytes=shard_mb << 20)
        finally:
            bar.close()
            skipped.report(log)
        if not staging.publish(staged, output, overwrite=overwrite):
            raise DataError(f"--output={output} was created by another process meanwhile; nothing was written.")
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(
        f"prepared {train['documents']} train documents ({train['tokens']} tokens) and {val['documents']} val "
        f"documents ({val['tokens']} tokens) from {len(paths)} files in {time.time() - start:.1f}s; removed "
        f"{manifest['duplicates_removed']} duplicates, skipped {skipped.total} -> {output}",
        file=log,
    )
    return read_manifest(output)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsjax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", action="extend", required=True,
                        help=".txt (one document per file), .jsonl and .parquet files, directories or globs")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.model, tokenizer.json, or a directory")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of documents held out")
    parser.add_argument("--dedup", choices=DEDUP_MODES, default="exact", help="drop repeated (normalized) texts")
    parser.add_argument("--text_field", default="text", help="the text field of .jsonl/.parquet records")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes; 0: one per core")
    parser.add_argument("--shard_mb", type=int, default=256, help="size of one ArrayRecord shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        prepare(args.input, args.tokenizer, args.output, val_fraction=args.val_fraction, dedup=args.dedup,
                text_field=args.text_field, overwrite=args.overwrite, workers=args.workers,
                shard_mb=args.shard_mb)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
