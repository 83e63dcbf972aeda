"""Rolling windows over a long token sequence: every token scored once, each with as much left context as fits.

With `stride == window` this gives exactly lm-evaluation-harness's `get_rolling_token_windows` (context_len 1)
made disjoint: disjoint windows, the last one moved back to a full window scoring only the new tokens. A smaller
stride re-reads context: each window after the first scores only the `stride` tokens past the previous window,
so those see at least `window - stride` tokens before them (the strided perplexity of the Hugging Face docs).
"""

from __future__ import annotations

import numpy as np


def rolling_windows(ids, window: int, stride: int | None = None) -> list[tuple[np.ndarray, int]]:
    """(sequence, n_scored) pairs covering ids[1:] (ids[0], e.g. bos, is context only).

    Each sequence has at most window + 1 tokens: `window` inputs predicting the next token of each.
    """
    ids = np.asarray(ids, dtype=np.int32)
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride ({stride}) <= window ({window}).")
    last = len(ids) - 1  # index of the final target
    out, done = [], 0  # targets ids[1:done+1] are scored
    end = min(window, last)
    while done < last:
        start = max(0, end - window)
        out.append((ids[start:end + 1], end - done))
        done = end
        end = min(end + stride, last)
    return out
