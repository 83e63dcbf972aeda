"""The built-in pretraining corpus: this Python's own standard library sources, on every machine, no download.

`ensure_builtin(config)` prepares it on first use into the cache directory (data.cache_dir, else $DSJAX_CACHE,
else ~/.cache/dsjax) and returns its paths; later calls find it there. It holds a BPE tokenizer trained with the
paper's recipe on the train split (data.builtin_vocab_size tokens; or the tokenizer file in data.tokenizer) and
train/val ArrayRecord shards made by `prepare.write_dataset`, so the dataset is an ordinary prepared one.

The sources are every `.py` file under the stdlib directory in sorted order, leaving out site-packages, the test
suites (test/, tests/, idle_test/, test_*.py: large, repetitive, and full of deliberately odd text) and pydoc_data
(one generated 750 KB string table). Each file is cut into documents at top-level statements (`split_top_level`:
functions, classes, import blocks, merged up to about 2 KB): whole files average 16 KB and reach 230 KB, so a file
would fill many consecutive batches of a small model and make them nearly identical; blocks of a few KB shuffle
into well-mixed batches. Held-out documents are picked by text hash like prepare does (data.builtin_val_fraction).
On CPython 3.11 that is ~730 files, 11 MB, 3.6M tokens with the 4000-token tokenizer, prepared in about 6 s.

The cache key covers the Python version, the file list (paths, sizes, mtimes) and the settings, so a different
stdlib or setting gets its own copy. Several processes calling at once each build aside and the first to finish
publishes (staging.py): all of them return the same directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

from dsjax.data import documents, prepare, staging
from dsjax.data.tokenizer import SPM_FILE, load_tokenizer, train_sentencepiece

RECIPE_VERSION = 2
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
_BLOCK_CHARS = 2000  # top-level blocks are merged until a document reaches this size


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The corpus files, sorted by path relative to the stdlib directory."""
    root = root or stdlib_dir()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]
        found.extend(Path(directory) / f for f in files if f.endswith(".py") and not f.startswith("test_"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def split_top_level(text: str, min_chars: int = _BLOCK_CHARS) -> list[str]:
    """Cuts source text before each unindented line that follows a blank line (a new top-level statement), then merges
    consecutive pieces until each reaches min_chars. The pieces concatenate back to the text exactly."""
    lines = text.splitlines(keepends=True)
    pieces, current = [], []
    for i, line in enumerate(lines):
        starts_block = i > 0 and line[:1] not in ("", " ", "\t", "\n", "#", ")", "]", "}") and not lines[i - 1].strip()
        if starts_block and sum(map(len, current)) >= min_chars:
            pieces.append("".join(current))
            current = []
        current.append(line)
    if current:
        pieces.append("".join(current))
    return pieces


def cache_root(config) -> Path:
    configured = config.data.cache_dir or os.environ.get("DSJAX_CACHE") or Path.home() / ".cache" / "dsjax"
    return Path(configured).expanduser()


def ensure_builtin(config) -> dict:
    """Paths of the prepared built-in corpus (building it if needed): dir, tokenizer, manifest, train/val shards."""
    data = config.data
    root = stdlib_dir()
    files = stdlib_files(root)
    tokenizer = load_tokenizer(data.tokenizer) if data.tokenizer else None
    stats = [(f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = {
        "recipe": RECIPE_VERSION,
        "python": sys.version,
        "files": stats,
        "val_fraction": data.builtin_val_fraction,
        "tokenizer": tokenizer.fingerprint if tokenizer else {"train_vocab_size": data.builtin_vocab_size},
    }
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    final = cache_root(config) / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{digest}"
    if not (final / prepare.MANIFEST).exists():
        _build(final, root, files, tokenizer, data.builtin_vocab_size, data.builtin_val_fraction)
    manifest = prepare.read_manifest(final)
    return {
        "dir": str(final),
        "tokenizer": str(final / manifest["tokenizer"]["file"]),
        "manifest": manifest,
        **{split: [str(final / s) for s in manifest["splits"][split]["shards"]] for split in prepare.SPLITS},
    }


def _build(final: Path, root: Path, files, tokenizer, vocab_size: int, val_fraction: float) -> None:
    start = time.time()
    print(f"preparing the built-in corpus ({len(files)} files of the Python standard library in {root}) "
          f"into {final} ...", file=sys.stderr)
    skipped = documents.Skipped()
    docs = [
        documents.Document(block, doc.location)
        for f in files
        for doc in documents.read_text_file(f, skipped)
        for block in split_top_level(doc.text)
        if block.strip()
    ]
    with staging.staging_dir(final) as staged:
        if tokenizer is None:
            train_texts = [d.text for d in docs if not prepare.held_out(prepare.text_hash(d.text), val_fraction)]
            tokenizer = train_sentencepiece(train_texts, vocab_size, staged / SPM_FILE)
        manifest = prepare.write_dataset(
            docs, tokenizer, staged, val_fraction=val_fraction, dedup="exact", skipped=skipped, workers=1,
            inputs=[f"{root}/**/*.py"], extra={"builtin": {"python": sys.version, "files": len(files)}},
        )
        published = staging.publish(staged, final, overwrite=False)
    train = manifest["splits"]["train"]
    print(f"built-in corpus {'ready' if published else 'prepared by another process'}: {train['documents']} train "
          f"documents, {train['tokens']} tokens, in {time.time() - start:.1f}s", file=sys.stderr)
