"""Log-likelihood of scored tokens in many token sequences: packed rows, length buckets, one jitted forward each.

Every evaluation reduces to this: a sequence `s` of token ids whose last `n_scored` tokens are to be scored, each
given everything before it (multiple choice: context + choice; bits-per-byte: one rolling window). Sequences that
share their unscored prefix (one context, several choices) run it once, and all are packed into rows of a few
padded lengths (`packing.py`). The output head runs over chunks of the sequence, so (batch, seq, vocab) float32
logits never exist whole (16 x 4096 x 102400 would be 27 GB).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax import sharding as shd
from dsjax.eval import packing
from dsjax.model.attention_ops import resolve_backend

# Logits materialized per chunk of the head: rows x chunk x vocab float32 values at most (512 MB).
HEAD_CHUNK_VALUES = 1 << 27


@dataclasses.dataclass(frozen=True)
class Scored:
    """Summed log-prob (nats) of the scored tokens, how many there were, and whether greedy decoding emits them all."""

    logprob: float
    tokens: int
    is_greedy: bool


def _head_chunk(rows: int, seq: int, vocab: int) -> int:
    chunk = seq
    while rows * chunk * vocab > HEAD_CHUNK_VALUES and chunk % 2 == 0 and chunk > 16:
        chunk //= 2
    return chunk


@functools.lru_cache(maxsize=8)
def _compiled(graphdef):
    """One jitted forward per model structure, so a new Scorer for new weights (in training) does not recompile."""
    return jax.jit(functools.partial(_token_logprobs, graphdef))


def _token_logprobs(graphdef, state, tokens, targets, positions, segment_ids, branch_ids=None):
    """log p(target) and argmax == target at every position of a (rows, seq) batch."""
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(tokens, positions, segment_ids, branch_ids)
    rows, seq, _ = hidden.shape
    chunk = _head_chunk(rows, seq, model.config.vocab_size)

    def one(args):
        h, t = args
        logits = model.logits(h)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == t

    split = lambda x: jnp.moveaxis(x.reshape(rows, seq // chunk, chunk, *x.shape[2:]), 1, 0)
    logprob, greedy = jax.lax.map(one, (split(hidden), split(targets)))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(rows, seq)
    return merge(logprob), merge(greedy)


class Scorer:
    """Scores token sequences with a model on a mesh, `batch_size` rows per compiled call.

    min_row: rows may be made up to this long (capped by the model's context) when packing several short sequences
    into each takes fewer tokens in all than one length bucket per sequence.
    share_prefixes: run a prefix shared by several sequences once (default: when the attention backend is `xla`,
    the one that takes `branch_ids`; the kernels score every sequence whole).
    """

    def __init__(self, model, mesh, rules, *, batch_size: int = 16, min_row: int = 256,
                 share_prefixes: bool | None = None):
        graphdef, self.state = nnx.split(model)
        self._forward = _compiled(graphdef)
        self.max_len = model.config.max_seq_len
        self.mesh, self.rules = mesh, tuple(rules)
        parallel = shd.data_parallel_size(mesh, self.rules)
        self.batch_size = -(-max(1, batch_size) // parallel) * parallel  # whole rows on every data-parallel shard
        self.min_row = min(min_row, self.max_len)
        if share_prefixes is None:
            share_prefixes = resolve_backend(model.config.attention, branch_ids=True) == "xla"
        self.share_prefixes = share_prefixes
        self._sharding = shd.batch_sharding(mesh, self.rules)

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        n_scored: Sequence[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Scored]:
        """For each sequence s, the log-prob of its last n tokens given the tokens before them.

        A sequence longer than the context plus one is cut from the left (its oldest context dropped), as
        lm-evaluation-harness does; `n_scored` must leave at least one token of context. progress(n, total) is
        told after each call how many more of the `total` sequences are done.
        """
        progress = progress or (lambda done, total: None)
        seqs = []
        for s, n in zip(sequences, n_scored, strict=True):
            s = np.asarray(s, dtype=np.int32)[-(self.max_len + 1):]
            if not 1 <= n <= len(s) - 1:
                raise ValueError(f"cannot score {n} tokens of a {len(s)}-token sequence (one token of context needed).")
            seqs.append((s, n))
        if not seqs:
            return []
        grouped = packing.group(seqs, self.share_prefixes)
        row_len, rows = packing.choose_rows(grouped.sizes(), self.min_row, self.max_len)
        copies = np.bincount(grouped.owner, minlength=len(grouped.unique))
        logprob = np.zeros(len(grouped.unique))
        greedy = np.ones(len(grouped.unique), dtype=bool)
        for start in range(0, len(rows), self.batch_size):
            arrays, spans = packing.build(grouped, rows[start:start + self.batch_size], self.batch_size, row_len)
            token_lp, token_greedy = self._run(*arrays)
            for u, (r, a, b) in spans.items():
                logprob[u] = float(token_lp[r, a:b].sum(dtype=np.float64))
                greedy[u] = bool(token_greedy[r, a:b].all())
            progress(int(copies[list(spans)].sum()), len(seqs))
        return [Scored(float(logprob[u]), n, bool(greedy[u])) for u, (_, n) in zip(grouped.owner, seqs)]

    def _run(self, tokens, targets, positions, segments, branches):
        put = lambda x: jax.device_put(x, self._sharding)
        branches = put(branches) if self.share_prefixes else None
        with shd.use_rules(self.mesh, self.rules):
            lp, greedy = self._forward(self.state, put(tokens), put(targets), put(positions), put(segments), branches)
        return np.asarray(lp), np.asarray(greedy)
