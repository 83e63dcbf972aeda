"""prepare: text files -> tokenized ArrayRecord shards and a JSON manifest, which the loader reads.

    python -m dsjax.data.prepare --input=DATA_DIR --tokenizer=TOK_DIR/tokenizer.model --output=OUT_DIR \
        [--format=text|chat|preference] [--val_fraction=0.01 | --val_input=FILES] [--dedup=exact|none] \
        [--text_field=text] [--max_len=N] [--overwrite]

OUT_DIR/manifest.json             documents, tokens, targets and UTF-8 bytes per split (bits-per-byte needs the
                                  bytes), the tokenizer's fingerprint, duplicates removed, what was skipped and why
OUT_DIR/tokenizer.model (.json)   a copy of the tokenizer, so the dataset carries what decodes it
OUT_DIR/train/NNNNN.array_record  one document per record: bos, its tokens, eos
OUT_DIR/train/lengths.npy         tokens per record, so a finite pass knows its length without reading the data
OUT_DIR/val/...                   the held-out split, same layout

A document goes to val by a hash of its normalized text, so the split does not depend on input order and two copies
of a text never straddle train and val; `--val_input` names the val files instead (every --input then goes to train).
The output appears only when complete: it is written aside, then renamed.

--format=chat reads TRL conversations (conversations.py) and renders them with the DeepSeek chat template (chat.py):
a record is a conversation's tokens followed by its per-token loss weights (records.py); `--max_len` cuts longer
ones (a row left with no trained token is skipped as truncated_away). Its manifest has `"data_format": "chat"`,
`max_len`, `truncated` (rows cut but kept) and per split `conversations`, `assistant_tokens` (the trained tokens:
assistant content and the eos closing each turn), and `targets` = assistant_tokens, `bytes` = UTF-8 bytes of the
trained responses, so that mixture weights and bits-per-byte count what the loss counts. Text manifests have no
`data_format` field (readers treat its absence as "text").

--format=preference reads TRL pairs (conversations.py): a record is a pair, the chosen conversation then the
rejected one (each from its own bos, each with its weights: the reply and its eos; each cut to --max_len), and
`<split>/pair_lengths.npy` holds their two lengths. Manifest: `"data_format": "preference"`, per split `pairs`,
`chosen_tokens`, `rejected_tokens` (trained tokens), targets = their sum; pairs go to val by the hash of the prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import shutil
import sys
import time
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsjax.data import chat, conversations, documents, encoding, records, staging
from dsjax.errors import DataError
from dsjax.data.tokenizer import Tokenizer, load_tokenizer

FORMAT = "dsjax-prepared/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DEDUP_MODES = ("none", "exact")
DATA_FORMATS = ("text", "chat", "preference")
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
        split = doc.split or ("val" if held_out(digest, val_fraction) else "train")
        batch.append((split, doc.text))
        batch_chars += len(doc.text)
        if batch_chars >= _BATCH_CHARS:
            flush()
            batch_chars = 0
    flush()
    for writer in writers.values():
        writer.close()

    _refuse_if_empty(totals, skipped, inputs, "document")
    splits = {}
    for split in SPLITS:
        t = totals[split]
        splits[split] = {
            **t,
            # Every token but a document's first is a next-token target: the count bits-per-byte divides by.
            "targets": t["tokens"] - t["documents"],
            **_shard_fields(writers[split], split, t["documents"]),
        }
    return _finish(out_dir, tokenizer, dtype, inputs=inputs, val_fraction=val_fraction, dedup=dedup,
                   duplicates=duplicates, skipped=skipped, splits=splits, extra=extra)


def _refuse_if_empty(totals: dict, skipped: documents.Skipped, inputs: Sequence[str], noun: str) -> None:
    if not any(t["documents"] for t in totals.values()):
        first = f", the first at {skipped.examples[0]}" if skipped.examples else ""
        raise DataError(
            f"--input={','.join(inputs)} holds no usable {noun} ({skipped.total} skipped: "
            f"{skipped.summary() or 'nothing to read'}{first})."
        )


def _shard_fields(writer: records.ShardWriter, split: str, documents_written: int) -> dict:
    return {
        "shards": [f"{split}/{p.name}" for p in writer.shards],
        "lengths": f"{split}/lengths.npy" if documents_written else None,
    }


def _finish(out_dir, tokenizer, dtype, *, inputs, val_fraction, dedup, duplicates, skipped, splits, extra) -> dict:
    """Copies the tokenizer in and writes the manifest, last; returns it."""
    _copy_tokenizer(tokenizer, out_dir)
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


def write_chat_dataset(
    convs: Iterable[conversations.Conversation],
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    val_fraction: float,
    dedup: str,
    skipped: documents.Skipped,
    inputs: Sequence[str],
    max_len: int | None = None,
    workers: int = 0,
    shard_bytes: int = 256 << 20,
    extra: dict | None = None,
) -> dict:
    """Tokenizes conversations (ids + loss weights, chat.py) into `out_dir` and writes its manifest last.

    Dedup and the val split go by the hash of the rendered conversation; `convs` may carry a forced split.
    """
    with encoding.Encoder(tokenizer, workers) as encode:
        dtype = records.token_dtype(tokenizer.vocab_size)
        writers = {split: records.ShardWriter(out_dir / split, dtype, shard_bytes) for split in SPLITS}
        keys = ("documents", "conversations", "tokens", "assistant_tokens", "bytes", "truncated")
        totals = {split: dict.fromkeys(keys, 0) for split in SPLITS}
        seen: set[bytes] = set()
        duplicates = 0
        batch: list[tuple[str, list[chat.Piece], conversations.Conversation]] = []

        def flush():
            texts = [t for _, parts, _ in batch for t in chat.texts(parts)]
            encoded = iter(encode(texts))
            for split, parts, conv in batch:
                ids, weights = chat.assemble(tokenizer, parts, [next(encoded) for _ in chat.texts(parts)])
                truncated = max_len is not None and len(ids) > max_len
                if truncated:
                    ids, weights = ids[:max_len], weights[:max_len]
                    if not weights.any():
                        skipped.add("truncated_away", conv.location,
                                    f"--max_len={max_len} cuts every assistant token of this conversation")
                        continue
                    trained = tokenizer.decode(ids[weights == 1])
                else:
                    trained = _trained_text(parts)
                writers[split].write(ids, weights)
                t = totals[split]
                t["documents"] += 1
                t["conversations"] += 1
                t["tokens"] += len(ids)
                t["assistant_tokens"] += int(weights.sum())
                t["bytes"] += len(trained.encode("utf-8"))
                t["truncated"] += int(truncated)
            batch.clear()

        batch_chars = 0
        for conv in convs:
            rendered = chat.render(conv.messages)
            digest = text_hash(rendered)
            if dedup == "exact":
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
            split = conv.split or ("val" if held_out(digest, val_fraction) else "train")
            batch.append((split, chat.pieces(conv.messages, train_from=conv.train_from), conv))
            batch_chars += len(rendered)
            if batch_chars >= _BATCH_CHARS:
                flush()
                batch_chars = 0
        flush()
    for writer in writers.values():
        writer.close()
    _refuse_if_empty(totals, skipped, inputs, "conversation")
    splits = {}
    for split in SPLITS:
        t = totals[split]
        splits[split] = {**t, "targets": t["assistant_tokens"], **_shard_fields(writers[split], split, t["documents"])}
    extra = {"data_format": "chat", "max_len": max_len,
             "truncated": sum(t["truncated"] for t in totals.values()), **(extra or {})}
    return _finish(out_dir, tokenizer, dtype, inputs=inputs, val_fraction=val_fraction, dedup=dedup,
                   duplicates=duplicates, skipped=skipped, splits=splits, extra=extra)


def write_preference_dataset(
    pairs: Iterable[conversations.Pair],
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    val_fraction: float,
    dedup: str,
    skipped: documents.Skipped,
    inputs: Sequence[str],
    max_len: int | None = None,
    workers: int = 0,
    shard_bytes: int = 256 << 20,
    extra: dict | None = None,
) -> dict:
    """Tokenizes preference pairs into `out_dir`: one record per pair, the chosen conversation (prompt + chosen,
    weights on the chosen reply) followed by the rejected one, each from its own bos, each cut to `max_len`; the
    (chosen, rejected) token counts of every record go to `<split>/pair_lengths.npy`. The val split goes by the
    hash of the prompt, so a held-out prompt is never trained on with other replies."""
    with encoding.Encoder(tokenizer, workers) as encode:
        dtype = records.token_dtype(tokenizer.vocab_size)
        writers = {split: records.ShardWriter(out_dir / split, dtype, shard_bytes) for split in SPLITS}
        keys = ("documents", "pairs", "tokens", "chosen_tokens", "rejected_tokens", "bytes", "truncated")
        totals = {split: dict.fromkeys(keys, 0) for split in SPLITS}
        pair_lengths: dict[str, list[tuple[int, int]]] = {split: [] for split in SPLITS}
        seen: set[bytes] = set()
        duplicates = 0
        batch: list = []

        def flush():
            texts = [t for _, sides, _ in batch for parts in sides for t in chat.texts(parts)]
            encoded = iter(encode(texts))
            for split, sides, pair in batch:
                out, truncated, trained_bytes = [], False, 0
                for parts in sides:
                    ids, weights = chat.assemble(tokenizer, parts, [next(encoded) for _ in chat.texts(parts)])
                    if max_len is not None and len(ids) > max_len:
                        ids, weights, truncated = ids[:max_len], weights[:max_len], True
                        trained_bytes += len(tokenizer.decode(ids[weights == 1]).encode("utf-8"))
                    else:
                        trained_bytes += len(_trained_text(parts).encode("utf-8"))
                    out.append((ids, weights))
                if not all(w.any() for _, w in out):
                    skipped.add("truncated_away", pair.location,
                                f"--max_len={max_len} cuts every token of the responses of this pair")
                    continue
                (c_ids, c_w), (r_ids, r_w) = out
                writers[split].write(np.concatenate([c_ids, r_ids]), np.concatenate([c_w, r_w]))
                pair_lengths[split].append((len(c_ids), len(r_ids)))
                t = totals[split]
                t["documents"] += 1
                t["pairs"] += 1
                t["tokens"] += len(c_ids) + len(r_ids)
                t["chosen_tokens"] += int(c_w.sum())
                t["rejected_tokens"] += int(r_w.sum())
                t["bytes"] += trained_bytes
                t["truncated"] += int(truncated)
            batch.clear()

        batch_chars = 0
        for pair in pairs:
            chosen = chat.render(pair.prompt + pair.chosen)
            rejected = chat.render(pair.prompt + pair.rejected)
            digest = hashlib.sha256(text_hash(chosen) + text_hash(rejected)).digest()
            if dedup == "exact":
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
            prompt_digest = text_hash(chat.render(pair.prompt))
            split = pair.split or ("val" if held_out(prompt_digest, val_fraction) else "train")
            n = len(pair.prompt)
            sides = [chat.pieces(pair.prompt + pair.chosen, train_from=n),
                     chat.pieces(pair.prompt + pair.rejected, train_from=n)]
            batch.append((split, sides, pair))
            batch_chars += len(chosen) + len(rejected)
            if batch_chars >= _BATCH_CHARS:
                flush()
                batch_chars = 0
        flush()
    for writer in writers.values():
        writer.close()
    _refuse_if_empty(totals, skipped, inputs, "preference pair")
    splits = {}
    for split in SPLITS:
        t = totals[split]
        if t["documents"]:
            np.save(out_dir / split / "pair_lengths.npy", np.asarray(pair_lengths[split], dtype=np.int64))
        splits[split] = {**t, "targets": t["chosen_tokens"] + t["rejected_tokens"],
                         **_shard_fields(writers[split], split, t["documents"]),
                         "pair_lengths": f"{split}/pair_lengths.npy" if t["documents"] else None}
    extra = {"data_format": "preference", "max_len": max_len,
             "truncated": sum(t["truncated"] for t in totals.values()), **(extra or {})}
    return _finish(out_dir, tokenizer, dtype, inputs=inputs, val_fraction=val_fraction, dedup=dedup,
                   duplicates=duplicates, skipped=skipped, splits=splits, extra=extra)


def _trained_text(parts: Sequence[chat.Piece]) -> str:
    """The text that a conversation's trained tokens spell (its replies; eos spells nothing)."""
    return "".join(p.text for p in parts if p.kind == "text" and p.weight)


def data_format(manifest: dict) -> str:
    """"text", "chat" or "preference": what a prepared dataset's records are."""
    return manifest.get("data_format", "text")


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
    format: str = "text",
    val_fraction: float = 0.01,
    val_inputs: Sequence[str] | None = None,
    dedup: str = "exact",
    text_field: str = "text",
    max_len: int | None = None,
    overwrite: bool = False,
    workers: int = 0,
    shard_mb: int = 256,
    progress: bool = True,
    log=None,
) -> dict:
    """The CLI as a function: checks its arguments, tokenizes in `workers` processes (0: one per core; call it
    under `if __name__ == "__main__":`, see encoding.py), publishes `output` atomically.

    format "text" (documents), "chat" (TRL conversations) or "preference" (TRL pairs); val_inputs: files that form
    the val split, all of `inputs` then going to train (val_fraction unused); max_len: cut each conversation to this
    many tokens (chat and preference only).
    """
    log = log or sys.stderr
    if format not in DATA_FORMATS:
        raise DataError(f"--format must be one of {', '.join(DATA_FORMATS)}, got {format!r}.")
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"--val_fraction must be between 0 and 1, got {val_fraction}.")
    if dedup not in DEDUP_MODES:
        raise DataError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {dedup!r}.")
    if max_len is not None and (format == "text" or max_len < 2):
        raise DataError(f"--max_len={max_len} needs --format=chat or preference and at least 2 tokens.")
    output = Path(output)
    if not staging.is_empty_or_missing(output) and not overwrite:
        raise DataError(f"--output={output} already exists and is not empty; pass --overwrite to replace it.")
    paths = documents.expand_inputs(inputs)
    val_paths = documents.expand_inputs(val_inputs) if val_inputs else []
    if val_inputs:
        val_fraction = 0.0
    tok = load_tokenizer(tokenizer)
    if format == "text":
        skipped = documents.Skipped()
    else:
        reasons = conversations.CHAT_REASONS if format == "chat" else conversations.PREFERENCE_REASONS
        skipped = documents.Skipped(reasons, "rows")
    start = time.time()
    total_bytes = sum(p.stat().st_size for p in paths + val_paths)
    all_inputs = list(inputs) + list(val_inputs or [])
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None if progress else True,
              file=log) as bar, staging.staging_dir(output) as staged:
        try:
            def read(files, split):
                if format == "text":
                    items = documents.read_documents(files, text_field, skipped, on_bytes=bar.update)
                elif format == "chat":
                    items = conversations.read_conversations(files, skipped, on_bytes=bar.update)
                else:
                    items = conversations.read_pairs(files, skipped, on_bytes=bar.update)
                return (dataclasses.replace(item, split=split) for item in items) if split else items

            items = read(paths, "train" if val_inputs else None)
            if val_paths:
                items = itertools.chain(items, read(val_paths, "val"))
            common = dict(val_fraction=val_fraction, dedup=dedup, skipped=skipped, inputs=all_inputs,
                          workers=workers, shard_bytes=shard_mb << 20,
                          extra={"val_inputs": list(val_inputs)} if val_inputs else None)
            if format == "text":
                manifest = write_dataset(items, tok, staged, **common)
            elif format == "chat":
                manifest = write_chat_dataset(items, tok, staged, max_len=max_len, **common)
            else:
                manifest = write_preference_dataset(items, tok, staged, max_len=max_len, **common)
        finally:
            bar.close()
            skipped.report(log)
        if not staging.publish(staged, output, overwrite=overwrite):
            raise DataError(f"--output={output} was created by another process meanwhile; nothing was written.")
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    what = {"text": "documents", "chat": "conversations", "preference": "pairs"}[format]
    if val_inputs and not val["documents"]:
        print(f"warning: --val_input={','.join(val_inputs)} gave no usable val {what}, so a run on {output} cannot "
              "measure held-out loss.", file=log)
    elif val_fraction > 0 and not val["documents"]:
        print(f"warning: --val_fraction={val_fraction} held out no document of {train['documents']}, so a run on "
              f"{output} cannot measure held-out loss; raise --val_fraction or set eval.every_steps=0.", file=log)
    print(
        f"prepared {train['documents']} train {what} ({train['tokens']} tokens) and {val['documents']} val "
        f"{what} ({val['tokens']} tokens) from {len(paths) + len(val_paths)} files in {time.time() - start:.1f}s; "
        f"removed {manifest['duplicates_removed']} duplicates, skipped {skipped.total}"
        + (f", truncated {manifest['truncated']} to --max_len={max_len}" if format != "text" else "")
        + f" -> {output}",
        file=log,
    )
    return read_manifest(output)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsjax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", action="extend", required=True,
                        help=".txt (one document per file), .jsonl and .parquet files, directories or globs")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.model, tokenizer.json, or a directory")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--format", choices=DATA_FORMATS, default="text",
                        help="text: documents; chat: TRL conversations (messages, or prompt/completion); "
                             "preference: TRL pairs (prompt/chosen/rejected, or chosen/rejected)")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of documents held out")
    parser.add_argument("--val_input", nargs="+", action="extend", default=None,
                        help="files that are the val split (instead of --val_fraction; all --input goes to train)")
    parser.add_argument("--dedup", choices=DEDUP_MODES, default="exact", help="drop repeated (normalized) texts")
    parser.add_argument("--text_field", default="text", help="the text field of .jsonl/.parquet records")
    parser.add_argument("--max_len", type=int, default=None,
                        help="chat/preference: cut each conversation to this many tokens")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes; 0: one per core")
    parser.add_argument("--shard_mb", type=int, default=256, help="size of one ArrayRecord shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        prepare(args.input, args.tokenizer, args.output, format=args.format, val_fraction=args.val_fraction,
                val_inputs=args.val_input, dedup=args.dedup, text_field=args.text_field, max_len=args.max_len,
                overwrite=args.overwrite, workers=args.workers, shard_mb=args.shard_mb)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
