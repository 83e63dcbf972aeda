"""Log-likelihood of scored tokens in many token sequences: packed rows, length buckets, one jitted forward each.

Every evaluation reduces to this: a sequence `s` of token ids whose last `n_scored` tokens are to be scored, each
given everything before it (multiple choice: context + choice; bits-per-byte: one rolling window). The sequences are
packed first-fit into rows (positions restart and attention stays inside each, via `segment_ids`), so short
multiple-choice sequences do not pay for padding; rows come in a few padded lengths (16, 24, 32, 48, 64, ...: at
most ~1.5x padding) and a fixed number of rows per call, so XLA compiles one program per length bucket, not one per
batch. The output head runs over chunks of the sequence, so (batch, seq, vocab) float32 logits never exist whole
(16 x 4096 x 102400 would be 27 GB).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax import sharding as shd

# Logits materialized per chunk of the head: rows x chunk x vocab float32 values at most (512 MB).
HEAD_CHUNK_VALUES = 1 << 27


@dataclasses.dataclass(frozen=True)
class Scored:
    """Summed log-prob (nats) of the scored tokens, how many there were, and whether greedy decoding emits them all."""

    logprob: float
    tokens: int
    is_greedy: bool


def bucket_length(n: int, cap: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them) holding n, at most `cap`."""
    size = 16
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size, cap)


def pack(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the sequences in each row, no row longer than row_len (O(n log n))."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(rooms, (lengths[i], -1))
        if at < len(rooms):
            room, r = rooms.pop(at)
        else:
            room, r = row_len, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(rooms, (room - lengths[i], r))
    return rows


def choose_rows(lengths: Sequence[int], min_row: int, cap: int) -> tuple[int, list[list[int]]]:
    """The row length (a bucket from the longest sequence's up to min_row) that packs into the fewest tokens."""
    best = None
    size = bucket_length(max(lengths), cap)
    while True:
        rows = pack(lengths, size)
        if best is None or len(rows) * size < len(best[1]) * best[0]:
            best = (size, rows)
        if size >= min(max(min_row, 16), cap):
            return best
        size = bucket_length(size + 1, cap)


def _head_chunk(rows: int, seq: int, vocab: int) -> int:
    chunk = seq
    while rows * chunk * vocab > HEAD_CHUNK_VALUES and chunk % 2 == 0 and chunk > 16:
        chunk //= 2
    return chunk


@functools.lru_cache(maxsize=8)
def _compiled(graphdef):
    """One jitted forward per model structure, so a new Scorer for new weights (in training) does not recompile."""
    return jax.jit(functools.partial(_token_logprobs, graphdef))


def _token_logprobs(graphdef, state, tokens, targets, positions, segment_ids):
    """log p(target) and argmax == target at every position of a (rows, seq) batch."""
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(tokens, positions, segment_ids)
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
    """

    def __init__(self, model, mesh, rules, *, batch_size: int = 16, min_row: int = 256):
        graphdef, self.state = nnx.split(model)
        self._forward = _compiled(graphdef)
        self.max_len = model.config.max_seq_len
        self.mesh, self.rules = mesh, tuple(rules)
        parallel = shd.data_parallel_size(mesh, self.rules)
        self.batch_size = -(-max(1, batch_size) // parallel) * parallel  # whole rows on every data-parallel shard
        self.min_row = min(min_row, self.max_len)
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
        # Inputs are s[:-1]; their lengths decide the packing.
        lengths = [len(s) - 1 for s, _ in seqs]
        row_len, rows = choose_rows(lengths, self.min_row, self.max_len)
        logprob = np.zeros(len(seqs))
        greedy = np.ones(len(seqs), dtype=bool)
        for start in range(0, len(rows), self.batch_size):
            batch_rows = rows[start:start + self.batch_size]
            arrays, spans = self._build(seqs, batch_rows, row_len)
            token_lp, token_greedy = self._run(*arrays)
            for i, (r, a, b) in spans.items():
                logprob[i] = float(token_lp[r, a:b].sum(dtype=np.float64))
                greedy[i] = bool(token_greedy[r, a:b].all())
            progress(sum(len(r) for r in batch_rows), len(seqs))
        return [Scored(float(lp), n, bool(g)) for lp, (_, n), g in zip(logprob, seqs, greedy)]

    def _build(self, seqs, batch_rows, row_len):
        shape = (self.batch_size, row_len)
        tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        spans = {}
        for r, members in enumerate(batch_rows):
            at = 0
            for k, i in enumerate(members):
                s, n = seqs[i]
                m = len(s) - 1
                tokens[r, at:at + m], targets[r, at:at + m] = s[:-1], s[1:]
                positions[r, at:at + m], segments[r, at:at + m] = np.arange(m), k + 1
                spans[i] = (r, at + m - n, at + m)
                at += m
        return (tokens, targets, positions, segments), spans

    def _run(self, tokens, targets, positions, segments):
        put = lambda x: jax.device_put(x, self._sharding)
        with shd.use_rules(self.mesh, self.rules):
            lp, greedy = self._forward(self.state, put(tokens), put(targets), put(positions), put(segments))
        return np.asarray(lp), np.asarray(greedy)
