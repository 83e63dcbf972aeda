"""A conversation set generated in code, for the offline SFT demo (`--config=tiny_sft`): small problems with one exact
answer each, that a ~2M-parameter model can learn in minutes.

The demo's tasks, `TASKS` (several phrasings each, so the model must read the question rather than a fixed layout):
  sort     3 to 5 digits, ascending                      "Sort these digits: 3 1 2"   -> "1 2 3"
  max      the largest of 3 to 5 digits                  "What is the largest of 3 1 2?" -> "3"
  min      the smallest of 3 to 5 digits                 "Find the minimum of 3 1 2." -> "1"
Two more can be asked for (`tasks=`), for a larger model or a longer run:
  add      a + b for 0 <= a, b <= 99                     "What is 37 + 5?"            -> "42"
  reverse  3 to 5 distinct letters a..j, reversed        "Reverse the list: c a j"    -> "j a c"
They are not in the demo because tiny does not learn them in minutes: fine-tuned 3600 steps of 8 x 128 tokens
(8 minutes, 2-core CPU) on 60000 conversations of add, reverse and sort, the quickstart model reached held-out exact
match 0.08 on add, 0.19 on reverse and 0.84 on sort (2026-12-03). Sort, max and min are answered by comparing
digit values, which attention does from content alone; add (carries, most significant digit first) and reverse need
position arithmetic.

A problem is held out by a hash of its identity, independent of the seed and the phrasing, so no held-out problem
is ever trained on under any seed. The identity of sort, max and min is the multiset of digits (its permutations
share the answer), shared by the three, so a held-out multiset is not sorted in training either; for add it is the
unordered pair (37 + 5 and 5 + 37 are one problem), for reverse the list itself. Held-out examples are distinct
problems; training examples are distinct (problem, phrasing) pairs. Everything is deterministic in the seed.

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

TASKS = ("sort", "max", "min")  # the demo's (module docstring)
ALL_TASKS = TASKS + ("add", "reverse")
DIGIT_TASKS = ("sort", "max", "min")  # one identity (the multiset of digits), so held out together
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
    "max": (
        "What is the largest of {items}?",
        "Which is the biggest: {items}?",
        "Find the maximum of {items}.",
        "Largest: {items}",
    ),
    "min": (
        "What is the smallest of {items}?",
        "Which is the least: {items}?",
        "Find the minimum of {items}.",
        "Smallest: {items}",
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
        items = rng.sample(LETTERS, n)
        return tuple(items), {"items": " ".join(items)}, " ".join(reversed(items))
    if task in DIGIT_TASKS:
        items = [str(rng.randint(0, 9)) for _ in range(n)]
        ordered = sorted(items)
        answer = {"sort": " ".join(ordered), "max": ordered[-1], "min": ordered[0]}[task]
        return tuple(ordered), {"items": " ".join(items)}, answer
    raise ConfigError(f"synthetic task {task!r} is not one of {', '.join(ALL_TASKS)}.")


def is_held_out(task: str, identity: tuple) -> bool:
    """Whether a problem belongs to the held-out side: a hash of its identity, the same for every seed."""
    family = "digits" if task in DIGIT_TASKS else task
    digest = hashlib.sha256(json.dumps([family, list(identity)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") < VAL_SHARE * 2.0**64


def examples(split: str, count: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> list[Example]:
    """`count` examples of "train" or "val", the tasks taking turns; deterministic in (split, count, seed, tasks)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    for task in tasks:
        if task not in ALL_TASKS:
            raise ConfigError(f"synthetic task {task!r} is not one of {', '.join(ALL_TASKS)}.")
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


def fingerprint(tasks: Sequence[str] = TASKS) -> str:
    """Names what `examples` produces: the tasks and this file's source, so a cache prepared from an older generator
    (other tasks, phrasings or split) is never reused."""
    source = Path(__file__).read_bytes()
    return hashlib.sha256(json.dumps(list(tasks)).encode() + source).hexdigest()[:12]


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
