"""A streamed chat reply in the DeepSeek chat template (PAPER.md, Alignment).

The template itself lives in dsjax/data/chat.py, the one place that renders and tokenizes it, so what SFT trains
on and what generation is prompted with are the same ids: `render_chat` is its string, `chat_prompt_ids` the ids
ending in the "Assistant:" generation prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from dsjax.data import chat as template
from dsjax.errors import ConfigError
from dsjax.generate.generator import Generator, find_stop
from dsjax.generate.sampling import SamplingParams


def _checked(messages: Sequence[dict]) -> Sequence[dict]:
    problem = template.check_messages(messages)  # a prompt may end before any assistant turn
    if problem is not None:
        raise ConfigError(f"chat messages: {problem[1]}.")
    return messages


def render_chat(messages: Sequence[dict], *, bos_token: str, eos_token: str, add_generation_prompt: bool = True) -> str:
    """The released template's text for `messages` (dicts with role and content)."""
    return template.render(_checked(messages), add_generation_prompt, bos_token=bos_token, eos_token=eos_token)


def chat_prompt_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """The ids of the rendered template, split exactly as SFT's training data is."""
    return template.tokenize(tokenizer, _checked(messages), add_generation_prompt)[0].tolist()


def stream_reply(generator: Generator, messages: Sequence[dict], *, max_new_tokens: int, sampling: SamplingParams,
                 stop: Sequence[str] = (), seed: int = 0, truncate: str | None = "left") -> Iterator[str]:
    """Yields the assistant's reply as text pieces, as tokens come, until eos, a stop string or max_new_tokens.

    A piece is held back while it could be the start of a stop string or ends in an unfinished UTF-8 character,
    so the concatenated pieces are exactly the reply text `generate` would return.
    """
    tokenizer = generator.tokenizer
    prompt = generator.check_lengths([chat_prompt_ids(tokenizer, messages)], max_new_tokens, truncate)
    shown = 0
    text = ""
    stopped = False

    def stop_check(row, ids):
        return find_stop(tokenizer.decode(_no_eos(ids, tokenizer.eos_id)), stop) is not None

    for out, n_out, done in generator.run(prompt, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                          chunk=1, stop_check=stop_check if stop else None):
        text = tokenizer.decode(_no_eos(out[0, : n_out[0]].tolist(), tokenizer.eos_id))
        at = find_stop(text, stop) if stop else None
        if at is not None:
            text, stopped = text[: at[0]], True
        safe = len(text) if (done[0] or stopped) else _safe_length(text, stop)
        if safe > shown:
            yield text[shown:safe]
            shown = safe
        if stopped:
            return


def _no_eos(ids, eos_id):
    return ids[:-1] if ids and ids[-1] == eos_id else ids


def _safe_length(text: str, stop: Sequence[str]) -> int:
    """How much of a still-growing text can be shown: not an unfinished character, not a possible stop start."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stop:
        hold = max([hold] + [k for k in range(1, min(len(s) - 1, end) + 1) if text[:end].endswith(s[:k])])
    return end - hold


def chat(model, tokenizer, messages: Sequence[dict], *, max_new_tokens: int = 256, stop: Sequence[str] = (),
         seed: int = 0, **sampling) -> str:
    """The assistant's next reply to `messages` in the DeepSeek chat template (greedy unless sampling is given)."""
    generator = Generator(model, tokenizer)
    parts = stream_reply(generator, messages, max_new_tokens=max_new_tokens, sampling=SamplingParams(**sampling),
                         stop=stop, seed=seed)
    return "".join(parts)


__all__ = ["chat", "chat_prompt_ids", "render_chat", "stream_reply"]
