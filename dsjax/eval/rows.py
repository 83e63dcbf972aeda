"""Reading a task's JSONL file: rows that cannot be parsed or fail the task's own check are skipped and counted, the
first locations printed; a file with no usable row is refused. One sentence per problem, naming file:line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from dsjax.errors import DataError


def read_rows(path, kind: str, parse: Callable[[dict, str], object | str], stream=None) -> tuple[list, dict]:
    """(examples, counts). parse(row, "file:line") returns an example, or a string saying why the row is malformed
    (it may also raise DataError for a row that is well formed but wrong)."""
    stream = stream or sys.stderr
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{kind}:{path} does not exist.")
    examples, skipped = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            location = f"{path}:{lineno}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                skipped.append(f"{location}: not a JSON line ({e})")
                continue
            parsed = parse(row, location) if isinstance(row, dict) else "a row must be a JSON object"
            if isinstance(parsed, str):
                skipped.append(f"{location}: {parsed}")
            else:
                examples.append(parsed)
    if skipped:
        print(f"skipped {len(skipped)} malformed rows of {path}; first ones:", file=stream)
        for line in skipped[:10]:
            print(f"  {line}", file=stream)
    if not examples:
        raise DataError(f"{kind}:{path} holds no usable row.")
    return examples, {"malformed": len(skipped)} if skipped else {}
