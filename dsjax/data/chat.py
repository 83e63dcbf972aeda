"""The DeepSeek LLM chat template, and which tokens of a conversation the SFT loss covers.

The released template (PAPER.md, Alignment; deepseek-llm-7b-chat `tokenizer_config.json`), for messages with roles
system, user and assistant:

    <bos>{system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}<eos>User: {user2}\\n\\nAssistant:

a system message is its text plus "\\n\\n", a user turn "User: {u}\\n\\n", an assistant turn "Assistant: {a}<eos>", and
the generation prompt "Assistant:" (no space). `render` produces that string exactly, as `transformers`'
`apply_chat_template` does with the Jinja template (the tests compare the two).

Tokens and loss. A conversation is tokenized in pieces that never cross a special token or the end of
"Assistant:": bos; the prompt text since the last special token, up to and including "Assistant:", as one string;
the response " " + content as one string; eos. The loss weight is 1 on every token of the response pieces (the
leading space included) and on the eos that closes each assistant turn, and 0 on bos, system and user text and the
"Assistant:" prefix. Why there: generation is given the prompt ending in "Assistant:" (`prompt_ids`, the ids that
`apply_chat_template(..., add_generation_prompt=True)` gives for byte-level BPE and our sentencepiece models), so
the model must itself produce the space, the content and the eos; training tokens are exactly the tokens it then
generates. Putting the space in the prefix instead would train on " "-less content tokens that generation never
conditions on (after "Assistant:" it would have to emit the content's first token without the space BPE merges
into it). The weight of predicting target t is the weight of token t (packing.py), so the model learns to start
the response after ":" and to stop with eos, and never learns to predict the next user turn.

Other roles are refused (the Jinja template silently drops them, which would corrupt training data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from dsjax.data.tokenizer import BOS, EOS, Tokenizer
from dsjax.errors import DataError

ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = "Assistant:"

# The verbatim Jinja template of the released chat models, for exported tokenizer_config.json files.
JINJA_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)


class Piece(NamedTuple):
    """A stretch of a rendered conversation: kind "bos", "eos" or "text", and the loss weight of its tokens."""

    kind: str
    text: str = ""
    weight: int = 0


def check(messages) -> tuple[str, str] | None:
    """(reason, detail) if `messages` cannot be a training conversation, else None.

    Reasons: invalid_message (not a list of {"role": str, "content": str}), unknown_role, empty_content
    (whitespace only), invalid_utf8 (a lone surrogate from a JSON escape), no_assistant.
    """
    problem = check_messages(messages)
    if problem:
        return problem
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant", "no assistant turn"
    return None


def check_messages(messages) -> tuple[str, str] | None:
    """`check` without requiring an assistant turn (a prompt for generation has none)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        return "invalid_message", "messages is not a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "invalid_message", f"message {i} is not an object with string 'role' and 'content'"
        if m["role"] not in ROLES:
            return "unknown_role", f"message {i} has role {m['role']!r}, not one of {', '.join(ROLES)}"
        if not m["content"].strip():
            return "empty_content", f"message {i} ({m['role']}) has empty content"
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            return "invalid_utf8", f"message {i} has a lone surrogate at character {e.start}"
    return None


def pieces(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, *,
           train_from: int = 0) -> list[Piece]:
    """The conversation as bos, text and eos pieces (see the module docstring for the split and the weights).

    Assistant turns before message `train_from` are context (weight 0), as the prompt of a prompt-completion row.
    """
    out = [Piece("bos")]
    prompt = ""
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            prompt += content + "\n\n"
        elif role == "user":
            prompt += "User: " + content + "\n\n"
        elif role == "assistant":
            w = int(i >= train_from)
            out += [Piece("text", prompt + GENERATION_PROMPT), Piece("text", " " + content, w), Piece("eos", weight=w)]
            prompt = ""
        else:
            raise DataError(f"message role {role!r} is not one of {', '.join(ROLES)}.")
    if add_generation_prompt:
        prompt += GENERATION_PROMPT
    if prompt:
        out.append(Piece("text", prompt))
    return out


def render(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, *,
           bos_token: str = BOS, eos_token: str = EOS) -> str:
    """The template's string, exactly as the Jinja template renders it."""
    specials = {"bos": bos_token, "eos": eos_token}
    return "".join(specials.get(p.kind, p.text) for p in pieces(messages, add_generation_prompt))


def assemble(tokenizer: Tokenizer, parts: Sequence[Piece],
             encoded: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, weights uint8) from the pieces and the token ids of their texts (the "text" pieces, in order).

    Split from `tokenize` so that prepare can encode the texts of many conversations in one batch.
    """
    ids: list[int] = []
    weights: list[int] = []
    encoded_texts = iter(encoded)
    for p in parts:
        special = {"bos": [tokenizer.bos_id], "eos": [tokenizer.eos_id]}.get(p.kind)
        piece_ids = special if special is not None else list(next(encoded_texts))
        ids += piece_ids
        weights += [p.weight] * len(piece_ids)
    return np.asarray(ids, np.int32), np.asarray(weights, np.uint8)


def texts(parts: Sequence[Piece]) -> list[str]:
    """The texts to encode for `assemble`."""
    return [p.text for p in parts if p.kind == "text"]


def tokenize(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, *,
             train_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and per-token loss weights (1: assistant response tokens and their eos) of a conversation."""
    problem = check_messages(messages)
    if problem:
        raise DataError(f"cannot tokenize this conversation: {problem[1]}.")
    parts = pieces(messages, add_generation_prompt, train_from=train_from)
    return assemble(tokenizer, parts, tokenizer.encode_batch(texts(parts)))


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids generation starts from: the conversation so far and the "Assistant:" generation prompt."""
    return tokenize(tokenizer, messages, add_generation_prompt=True)[0].tolist()


def response_text(tokenizer: Tokenizer, ids) -> str:
    """The assistant content of generated ids (what follows `prompt_ids`): up to the first eos, the template's
    leading space removed."""
    ids = list(np.asarray(ids).tolist())
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    text = tokenizer.decode(ids)
    return text[1:] if text.startswith(" ") else text
