"""The repetition ratio the paper tracks during SFT: the share of greedy responses that never terminate and repeat a
span instead.

A response is repetitive when (1) generation stopped at max_new_tokens, not at eos, and (2) its tail is one span
repeated back to back: for some period p (1 <= p <= n/2), the last max(2p, n/2) characters of the n-character text
all equal the character p positions earlier. So at least two whole copies of the span end the text, and they cover
at least half of it: "12 12 12 12 12 12" and "Sure: ab ab ab ab ab ab" are repetitive, a long answer that merely ran
out of tokens is not.
"""

from __future__ import annotations

from collections.abc import Sequence


def repeated_tail(text: str) -> int | None:
    """The shortest period p whose back-to-back copies fill the text's tail (see the module docstring), or None."""
    n = len(text)
    for p in range(1, n // 2 + 1):
        tail = max(2 * p, (n + 1) // 2)
        if all(text[i] == text[i - p] for i in range(n - tail + p, n)):
            return p
    return None


def is_repetitive(text: str, finished: bool) -> bool:
    """`finished`: generation ended at eos (or a stop string) rather than at the token limit."""
    return not finished and repeated_tail(text) is not None


def repetition_ratio(texts: Sequence[str], finished: Sequence[bool]) -> float:
    if not texts:
        return 0.0
    return sum(is_repetitive(t, f) for t, f in zip(texts, finished)) / len(texts)
