"""Write-then-rename for output directories: a reader sees a complete directory or none, never a half-written one.

Work happens in a hidden sibling `.NAME.partial-PID-RANDOM`, removed if anything fails (Ctrl-C included); `publish`
renames it into place. Two processes racing to publish the same directory both finish; the first one wins.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = final.parent / f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staged.mkdir()
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def is_empty_or_missing(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def publish(staged: Path, final: Path, *, overwrite: bool) -> bool:
    """Moves `staged` to `final`; False (and `staged` left for its context to remove) if `final` is kept."""
    if not is_empty_or_missing(final):
        if not overwrite:
            return False
        old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(final, old)
        os.rename(staged, final)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
        return True
    try:
        os.rename(staged, final)  # onto a missing or empty directory: atomic
    except OSError:
        if is_empty_or_missing(final):
            raise
        return False  # another process published first
    return True
