"""Raw documents from `.txt`, `.jsonl` and `.parquet` inputs; bad ones are counted and located, never fatal.

A `.txt` file is one document (its text kept byte for byte); a `.jsonl` line and a `.parquet` row are one document
each, their text in a configurable field. Skip reasons: invalid_utf8, invalid_json, missing_field (absent or not a
string), empty (whitespace only). Blank `.jsonl` lines are not documents and are passed over silently.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from dsjax.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")
REASONS = ("invalid_utf8", "invalid_json", "missing_field", "empty")


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    location: str  # "file:line" (or "file:row N" for parquet), for messages
    split: str | None = None  # "train" or "val" when the input decides (prepare --val_input), else by text hash


class Skipped:
    """Counts of skipped documents (or rows: `noun`) by reason, and the first few locations to show the user."""

    MAX_EXAMPLES = 10

    def __init__(self, reasons: Sequence[str] = REASONS, noun: str = "documents"):
        self.counts: collections.Counter[str] = collections.Counter({reason: 0 for reason in reasons})
        self.examples: list[str] = []
        self.noun = noun

    def add(self, reason: str, location: str, detail: str, count: int = 1) -> None:
        assert reason in self.counts, reason
        self.counts[reason] += count
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(f"{location}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.counts.items() if n)

    def report(self, stream) -> None:
        if self.total:
            print(f"skipped {self.total} {self.noun} ({self.summary()}); first ones:", file=stream)
            for example in self.examples:
                print(f"  {example}", file=stream)

    def to_json(self) -> dict:
        return dict(self.counts)


def expand_inputs(specs: Sequence[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs -> a sorted, de-duplicated list of input files."""
    paths: list[Path] = []
    for spec in specs:
        if glob.has_magic(spec):
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            found = [f for m in matches for f in (_files_under(m) if m.is_dir() else [m]) if f.suffix in SUFFIXES]
            if not found:
                raise DataError(f"--input {spec} matches no {'/'.join(SUFFIXES)} file.")
        elif os.path.isdir(spec):
            found = _files_under(Path(spec))
            if not found:
                raise DataError(f"--input {spec} is a directory with no {'/'.join(SUFFIXES)} file in it.")
        elif os.path.isfile(spec):
            found = [Path(spec)]
            if found[0].suffix not in SUFFIXES:
                raise DataError(f"--input {spec} is not a {'/'.join(SUFFIXES)} file.")
        else:
            raise DataError(f"--input {spec} does not exist.")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in SUFFIXES and p.is_file())


def read_documents(
    paths: Sequence[Path],
    text_field: str,
    skipped: Skipped,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[Document]:
    """Documents of every file in order; `on_bytes(n)` reports raw input consumed, for a progress bar."""
    on_bytes = on_bytes or (lambda n: None)
    for path in paths:
        if path.suffix == ".txt":
            yield from read_text_file(path, skipped, on_bytes)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path, text_field, skipped, on_bytes)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path, text_field, skipped, on_bytes)
        else:
            raise DataError(f"input {path} is not a {'/'.join(SUFFIXES)} file.")


def as_document(text: str, location: str, skipped: Skipped) -> Document | None:
    """The document if its text is usable; lone surrogates (from JSON escapes) are not valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        skipped.add("invalid_utf8", location, f"lone surrogate at character {e.start}")
        return None
    if not text.strip():
        skipped.add("empty", location, "empty document")
        return None
    return Document(text, location)


def read_text_file(path: Path, skipped: Skipped, on_bytes=lambda n: None) -> Iterator[Document]:
    """The whole file as one document (a .txt input, or a source file of the built-in corpus)."""
    data = path.read_bytes()
    on_bytes(len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        skipped.add("invalid_utf8", f"{path}:{line}", f"invalid UTF-8 byte at offset {e.start}")
        return
    doc = as_document(text, f"{path}:1", skipped)
    if doc:
        yield doc


def _read_jsonl(path: Path, text_field: str, skipped: Skipped, on_bytes) -> Iterator[Document]:
    for record, location in read_jsonl_records(path, skipped, on_bytes):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            skipped.add("missing_field", location, f"no string field {text_field!r}")
            continue
        doc = as_document(text, location, skipped)
        if doc:
            yield doc


def read_jsonl_records(path: Path, skipped: Skipped, on_bytes=lambda n: None) -> Iterator[tuple[object, str]]:
    """(parsed JSON value, "file:line") of every non-blank line; undecodable lines are skipped and counted."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            on_bytes(len(raw))
            location = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skipped.add("invalid_utf8", location, f"invalid UTF-8 byte at column {e.start + 1}")
                continue
            try:
                yield json.loads(line), location
            except json.JSONDecodeError as e:
                skipped.add("invalid_json", location, f"invalid JSON ({e.msg} at column {e.colno})")


def open_parquet(path: Path):
    """A pyarrow ParquetFile, or one sentence on why not."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed (pip install pyarrow).") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for a file that is not parquet.
        raise DataError(f"{path} is not a readable parquet file ({e}).") from None


def read_records(paths: Sequence[Path], columns: Sequence[str], skipped: Skipped,
                 on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[object, str]]:
    """(record, location) of every `.jsonl` line and `.parquet` row (as a dict of the `columns` it has), for
    inputs whose records are more than one text field (conversations); `.txt` files are refused."""
    on_bytes = on_bytes or (lambda n: None)
    for path in paths:
        if path.suffix == ".jsonl":
            yield from read_jsonl_records(path, skipped, on_bytes)
        elif path.suffix == ".parquet":
            parquet = open_parquet(path)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            if not present:  # every row lacks the fields: count each one
                for row in range(1, parquet.metadata.num_rows + 1):
                    yield {}, f"{path}:row {row}"
                on_bytes(path.stat().st_size)
                continue
            bytes_per_row = path.stat().st_size / max(parquet.metadata.num_rows, 1)
            row = 0
            for batch in parquet.iter_batches(columns=present, batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield record, f"{path}:row {row}"
                on_bytes(int(bytes_per_row * batch.num_rows))
        else:
            raise DataError(f"input {path} is not a .jsonl or .parquet file; conversations come in those only.")


def _read_parquet(path: Path, text_field: str, skipped: Skipped, on_bytes) -> Iterator[Document]:
    parquet = open_parquet(path)
    rows = parquet.metadata.num_rows
    if text_field not in parquet.schema_arrow.names:
        skipped.add("missing_field", f"{path}", f"no column {text_field!r} in {rows} rows", count=rows)
        on_bytes(path.stat().st_size)
        return
    bytes_per_row = path.stat().st_size / max(rows, 1)
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            location = f"{path}:row {row}"
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    skipped.add("invalid_utf8", location, f"invalid UTF-8 byte at offset {e.start}")
                    continue
            if not isinstance(value, str):
                skipped.add("missing_field", location, f"no string in column {text_field!r}")
                continue
            doc = as_document(value, location, skipped)
            if doc:
                yield doc
        on_bytes(int(bytes_per_row * batch.num_rows))
