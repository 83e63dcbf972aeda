"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The processors run in Hugging Face `generate`'s order and with its definitions, so a setting means the same here as
there: repetition penalty on the raw logits (every id already in the prompt or the output: positive logits divided by
the penalty, negative ones multiplied), then temperature, top-k (keep logits >= the k-th largest), top-p (keep the
smallest top set whose probability reaches p), min-p (keep tokens whose probability is at least min_p times the top
one's). Temperature 0 is greedy (argmax after the penalty). Ids at or above the tokenizer's size (the model's vocab
is padded, e.g. 100015 -> 102400) are masked first, so they can never be produced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax.errors import ConfigError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Hashable (a static jit argument): a setting that is off compiles to nothing."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = (
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0 (0 is off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 is off)"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1) (0 is off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 is off)"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} {rule}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """-inf for ids >= vocab_size (the tokenizer's real size) of (batch, model_vocab) logits."""
    if vocab_size >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, NEG_INF)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor; `seen` (batch, vocab) bool marks the ids present so far."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """HF's TopPLogitsWarper: drop the ascending-sorted tokens whose cumulative probability is <= 1 - p (the most
    likely token always stays)."""
    if p >= 1:
        return logits
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop = (cumulative <= 1 - p).at[..., -1].set(False)
    # The smallest kept logit; ties with it stay too.
    threshold = jnp.min(jnp.where(drop, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG_INF, logits)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    if min_p <= 0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, NEG_INF)


def process_logits(logits: jax.Array, seen: jax.Array | None, params: SamplingParams, vocab_size: int) -> jax.Array:
    """Float32 (batch, vocab) logits after the padded-vocab mask and every processor `params` turns on."""
    logits = mask_padded_vocab(logits.astype(jnp.float32), vocab_size)
    if params.repetition_penalty != 1 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample(logits: jax.Array, key: jax.Array, seen: jax.Array | None, params: SamplingParams, vocab_size: int):
    """Next token per row, int32 (batch,)."""
    logits = process_logits(logits, seen, params, vocab_size)
    if params.greedy:
        return first_max(logits, vocab_size)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def first_max(logits: jax.Array, vocab_size: int) -> jax.Array:
    """argmax's answer (the first of tied maxima) as a max and a min, int32 (batch,); never an id >= vocab_size.

    XLA:CPU runs `argmax`'s (value, index) reduction several times slower than these two plain reductions, and greedy
    decoding runs it over the whole vocabulary at every step.
    """
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == top, ids, logits.shape[-1]), axis=-1)
    return jnp.minimum(first, vocab_size - 1)  # a NaN row matches nothing
