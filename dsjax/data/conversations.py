"""TRL-format rows -> conversations (message lists) for `prepare --format=chat`, and preference pairs for
`--format=preference` (DPO); bad rows are counted, never fatal.

Accepted rows (`.jsonl` lines or `.parquet` rows), as TRL's SFTTrainer takes them:
  conversational      {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  prompt-completion   {"prompt": P, "completion": C}, each a string or a message list; a string prompt is one user
                      message and a string completion one assistant message. Only the completion is trained on (TRL's
                      completion-only loss): assistant turns inside the prompt are context.
Skip reasons: those of the text reader (invalid_utf8, invalid_json, missing_field) and of `chat.check`
(invalid_message, unknown_role, empty_content, no_assistant); prepare adds truncated_away (--max_len cut every
trained token). Preference rows (`preference_row`) add identical (chosen == rejected) and no_shared_prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from dsjax.data import chat, documents

CHAT_REASONS = ("invalid_utf8", "invalid_json", "missing_field", "invalid_message", "unknown_role", "empty_content",
                "no_assistant", "truncated_away")
CHAT_COLUMNS = ("messages", "prompt", "completion")


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]
    train_from: int  # assistant turns before this message index carry no loss (a prompt-completion row's prompt)
    location: str  # "file:line" or "file:row N"
    split: str | None = None  # "train" or "val" when the input decides (prepare --val_input), else by hash


class BadRow(ValueError):
    """A row that cannot be used: `reason` (a skip reason) and `detail` (for the file:line message)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def as_messages(value, role: str, field: str) -> list[dict[str, str]]:
    """A string (one message of `role`) or a message list -> a list of plain {"role", "content"} dicts."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, (list, tuple)):
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRow("invalid_message", f"{field}[{i}] is not an object with string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise BadRow("missing_field", f"{field!r} is neither a string nor a message list")


def chat_row(record) -> tuple[list[dict[str, str]], int]:
    """(messages, train_from) of a conversational or prompt-completion row; raises BadRow."""
    if not isinstance(record, dict):
        raise BadRow("missing_field", "the row is not a JSON object")
    if record.get("messages") is not None:
        if not isinstance(record["messages"], (list, tuple)):
            raise BadRow("missing_field", "'messages' is not a message list")
        messages, train_from = as_messages(record["messages"], "user", "messages"), 0
        if not messages:
            raise BadRow("invalid_message", "'messages' is empty")
    elif record.get("prompt") is not None and record.get("completion") is not None:
        prompt = as_messages(record["prompt"], "user", "prompt")
        messages, train_from = prompt + as_messages(record["completion"], "assistant", "completion"), len(prompt)
    else:
        raise BadRow("missing_field", "no 'messages' list and no 'prompt' and 'completion' fields")
    problem = chat.check_messages(messages)
    if problem:
        raise BadRow(*problem)
    if not any(m["role"] == "assistant" for m in messages[train_from:]):
        raise BadRow("no_assistant", "no assistant turn" + (" in the completion" if train_from else ""))
    return messages, train_from


def read_conversations(paths: Sequence[Path], skipped: documents.Skipped,
                       on_bytes: Callable[[int], None] | None = None) -> Iterator[Conversation]:
    """The usable conversations of every file, in order; the rest are counted in `skipped` with file:line."""
    for record, location in documents.read_records(paths, CHAT_COLUMNS, skipped, on_bytes):
        try:
            messages, train_from = chat_row(record)
        except BadRow as bad:
            skipped.add(bad.reason, location, bad.detail)
            continue
        yield Conversation(messages, train_from, location)


# --- preference pairs (prepare --format=preference, for DPO) ---------------------------------------------------------

PREFERENCE_REASONS = CHAT_REASONS + ("identical", "no_shared_prompt")
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: list[dict[str, str]]  # the conversation so far
    chosen: list[dict[str, str]]  # the preferred continuation (its assistant turns are trained)
    rejected: list[dict[str, str]]
    location: str
    split: str | None = None


def preference_row(record) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) message lists of a TRL preference row; raises BadRow.

    Explicit: {"prompt", "chosen", "rejected"}, each a string (a user prompt, assistant replies) or a message list.
    Implicit: {"chosen": messages, "rejected": messages} that share all but their last message, an assistant turn.
    """
    if not isinstance(record, dict) or record.get("chosen") is None or record.get("rejected") is None:
        raise BadRow("missing_field", "no 'chosen' and 'rejected' fields")
    if record.get("prompt") is not None:
        prompt = as_messages(record["prompt"], "user", "prompt")
        chosen = as_messages(record["chosen"], "assistant", "chosen")
        rejected = as_messages(record["rejected"], "assistant", "rejected")
    else:
        if not isinstance(record["chosen"], (list, tuple)) or not isinstance(record["rejected"], (list, tuple)):
            raise BadRow("no_shared_prompt", "no 'prompt', and 'chosen' and 'rejected' are not message lists")
        full_c = as_messages(record["chosen"], "assistant", "chosen")
        full_r = as_messages(record["rejected"], "assistant", "rejected")
        if len(full_c) < 2 or full_c[:-1] != full_r[:-1]:
            raise BadRow("no_shared_prompt", "'chosen' and 'rejected' do not share all but their last message")
        prompt, chosen, rejected = full_c[:-1], full_c[-1:], full_r[-1:]
    for name, part in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        problem = chat.check_messages(part)
        if problem:
            raise BadRow(problem[0], f"{name}: {problem[1]}")
        if name != "prompt" and not any(m["role"] == "assistant" for m in part):
            raise BadRow("no_assistant", f"{name} has no assistant turn")
    if chosen == rejected:
        raise BadRow("identical", "chosen and rejected are identical")
    return prompt, chosen, rejected


def read_pairs(paths: Sequence[Path], skipped: documents.Skipped,
               on_bytes: Callable[[int], None] | None = None) -> Iterator[Pair]:
    """The usable preference pairs of every file, in order; the rest are counted in `skipped` with file:line."""
    for record, location in documents.read_records(paths, PREFERENCE_COLUMNS, skipped, on_bytes):
        try:
            prompt, chosen, rejected = preference_row(record)
        except BadRow as bad:
            skipped.add(bad.reason, location, bad.detail)
            continue
        yield Pair(prompt, chosen, rejected, location)
