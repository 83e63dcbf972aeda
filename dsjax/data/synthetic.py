"""A conversation set generated in code, for the offline SFT demo (`--config=tiny_sft`): small problems with one exact
answer each, that a ~2M-parameter model can learn in minutes.

Tasks (several phrasings each, so the model must read the question rather than a fixed layout):
  add      a + b for 0 <= a, b <= 99                     "What is 37 + 5?"            -> "42"
  reverse  3 to 5 letters a..j, reversed                 "Reverse the list: c a j"    -> "j a c"
  sort     3 to 5 digits, ascending                      "Sort these digits: 3 1 2"   -> "1 2 3"
A problem is held out by a hash of its identity, independent of the seed and the phrasing, so no held-out problem
is ever trained on under any seed. The identity is the unordered pair for add (37 + 5 and 5 + 37 are one problem)
and the multiset for sort (its permutations share the answer); the list itself for reverse. Held-out examples are
distinct problems; training examples are distinct (problem, phrasing) pairs. Everything is deterministic in the seed.

    train, val = write_jsonl("data/sft", train_count=20000, val_count=500)   # TRL {"messages": ...} rows
    python -m dsjax.data.prepare --format=chat --input=data/sft/train.jsonl --val_input=data/sft/val.jsonl ...
    pairs = held_out(500)   # [(prompt messages, exact answer)]: the val rows without their answers
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from dsjax.errors import ConfigError

TASKS = ("add", "reverse", "sort")
VAL_SHARE = 0.1  # share of each task's problems that only ever appear held out
LETTERS = "abcdefghij"

TEMPLATES = {
    "add": (
        "What is {a} + {b}?",
        "Compute {a} plus {b}.",
        "{a} + {b} = ?",
        "Add {a} and {b}.",
        "What is the sum of {a} and {b}?",
    ),
    "reverse": (
        "Reverse the list: {items}",
        "Write {items} backwards.",
        "What is {items} in reverse order?",
        "Reverse: {items}",
    ),
    "sort": (
        "Sort these digits: {items}",
        "Put {items} in increasing order.",
        "Sort {items} from smallest to largest.",
        "Sort: {items}",
    ),
}


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # the user message
    answer: str  # the exact expected assistant reply

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt as a message list (what generation starts from)."""
        return [{"role": "user", "content": self.prompt}]

    def conversation(self) -> dict:
        """The TRL conversational row: the prompt and the answer as the assistant turn."""
        return {"messages": self.messages + [{"role": "assistant", "content": self.answer}]}


def _problem(task: str, rng: random.Random) -> tuple[tuple, dict, str]:
    """(identity, template fields, answer) of a random problem of `task`."""
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return (min(a, b), max(a, b)), {"a": a, "b": b}, str(a + b)
    n = rng.randint(3, 5)
    if task == "reverse":
        items = [rng.choice(LETTERS) for _ in range(n)]
        return tuple(items), {"items": " ".join(items)}, " ".join(reversed(items))
    if task == "sort":
        items = [str(rng.randint(0, 9)) for _ in range(n)]
        return tuple(sorted(items)), {"items": " ".join(items)}, " ".join(sorted(items))
    raise ConfigError(f"synthetic task {task!r} is not one of {', '.join(TASKS)}.")


def is_held_out(task: str, identity: tuple) -> bool:
    """Whether a problem belongs to the held-out side: a hash of its identity, the same for every seed."""
    digest = hashlib.sha256(json.dumps([task, list(identity)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") < VAL_SHARE * 2.0**64


def examples(split: str, count: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> list[Example]:
    """`count` examples of "train" or "val", the tasks taking turns; deterministic in (split, count, seed, tasks)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"synthetic task {task!r} is not one of {', '.join(TASKS)}.")
    rng = random.Random(f"dsjax-synthetic-{split}-{seed}")
    val = split == "val"
    seen: set = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < count:
        task = tasks[len(out) % len(tasks)]
        identity, fields, answer = _problem(task, rng)
        template = rng.randrange(len(TEMPLATES[task]))
        key = (task, identity) if val else (task, identity, template)
        attempts += 1
        if attempts > 100 * count + 10_000:
            raise ConfigError(f"cannot draw {count} distinct {split} problems of tasks {', '.join(tasks)}; ask fewer.")
        if is_held_out(task, identity) != val or key in seen:
            continue
        seen.add(key)
        out.append(Example(task, TEMPLATES[task][template].format(**fields), answer))
    return out


def held_out(count: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, exact answer) of the held-out problems: the rows of write_jsonl's val.jsonl."""
    return [(e.messages, e.answer) for e in examples("val", count, seed, tasks)]


def write_jsonl(directory: str | Path, *, train_count: int, val_count: int, seed: int = 0,
                tasks: Sequence[str] = TASKS) -> tuple[Path, Path]:
    """Writes `train.jsonl` and `val.jsonl` (TRL conversational rows) into `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, count in (("train", train_count), ("val", val_count)):
        path = directory / f"{split}.jsonl"
        rows = "".join(json.dumps(e.conversation()) + "\n" for e in examples(split, count, seed, tasks))
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(rows, encoding="utf-8")
        partial.replace(path)
        paths.append(path)
    return paths[0], paths[1]
