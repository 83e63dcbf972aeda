"""Greedy answers to held-out prompts, scored: the exact-match accuracy and the paper's repetition ratio that SFT
and DPO log as `exact_match` and `repetition_ratio` before and after training (both tasks score the same way, so
the walkthrough's numbers compare from one stage to the next)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dsjax.data import chat
from dsjax.eval.repetition import is_repetitive


def answer_metrics(model, tokenizer, prompts: Sequence[Sequence[int]], references: Sequence[str | None], *,
                   exact_match_examples: int, repetition_prompts: int, max_new_tokens: int,
                   log: Callable[[str], None] = print, chats: int = 0) -> dict:
    """Greedy replies to `prompts` (ids ending in the generation prompt); `exact_match` over the first
    exact_match_examples (the reply equals its reference, surrounding whitespace aside) and `repetition_ratio`
    over the first repetition_prompts. A prompt longer than the context beside max_new_tokens keeps its end."""
    count = min(len(prompts), max(exact_match_examples, repetition_prompts))
    if not count:
        return {}
    from dsjax.generate import Generator

    generator = Generator(model, tokenizer)
    room = model.config.max_seq_len - max_new_tokens
    out = generator.generate([list(p)[-room:] for p in prompts[:count]], max_new_tokens=max_new_tokens)
    answers = [chat.response_text(tokenizer, c.ids) for c in out]
    metrics = {}
    if exact_match_examples:
        n = min(exact_match_examples, count)
        metrics["exact_match"] = float(np.mean([a.strip() == (r or "").strip()
                                                for a, r in zip(answers[:n], references[:n])]))
    if repetition_prompts:
        n = min(repetition_prompts, count)
        metrics["repetition_ratio"] = float(np.mean([is_repetitive(a, c.finish_reason != "length")
                                                     for a, c in zip(answers[:n], out.completions[:n])]))
    for i in range(min(chats, count)):
        prompt = tokenizer.decode([t for t in prompts[i] if t != tokenizer.bos_id])
        log(f"--- chat {i + 1}:\n{prompt} {answers[i]}\n(reference: {references[i]!r})")
    return metrics


def log_before_after(before: dict, after: dict, log: Callable[[str], None]) -> None:
    for key, value in after.items():
        was = f"{before[key]:.3f} before training, " if key in before else ""
        log(f"{key}: {was}{value:.3f} after (held-out, greedy)")
