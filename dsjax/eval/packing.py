"""Laying scored sequences out in rows: one shared prefix per context, best-fit packing, a few padded row lengths.

A sequence `s` whose last `n` tokens are scored feeds the model its inputs s[:-1]: a prefix s[:-n-1], whose outputs
are not scored, and a branch s[-n-1:-1], whose outputs predict the n scored tokens (the prefix's last token would
predict the first one, so it belongs to the branch). Sequences with the same prefix form a group: a multiple-choice
context with its choices, lm-eval's requests for one context. A group's prefix is laid out once, followed by its
branches; `branch_ids` let each branch see the prefix and itself only (`dsjax.model.attention_ops`) and its
positions continue from the prefix's length, so each branch's log-probs are its own sequence's. Identical sequences
are laid out once.

Groups are packed best-fit into rows of one length (positions restart in each segment, attention stays inside it via
`segment_ids`), so short sequences do not pay for padding; a group longer than a row is split, its prefix repeated
in each row it takes. Rows come in a few padded lengths (16, 24, 32, 48, 64, ...: at most ~1.5x padding), so XLA
compiles one program per length, not one per batch.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

Segment = tuple[int, list[int]]  # (group, its branches laid out in this row after the group's prefix)


@dataclasses.dataclass
class Groups:
    """Distinct sequences (`unique`, each a (tokens, n_scored) pair) grouped by prefix.

    `owner[i]`: the distinct sequence the i-th input sequence is; `prefixes[g]` and `branches[g]`: group g's prefix
    length and its distinct sequences.
    """

    unique: list[tuple[np.ndarray, int]]
    owner: list[int]
    prefixes: list[int]
    branches: list[list[int]]

    def sizes(self) -> list[tuple[int, list[int]]]:
        return [(p, [self.unique[u][1] for u in b]) for p, b in zip(self.prefixes, self.branches)]


def group(seqs: Sequence[tuple[np.ndarray, int]], share: bool = True) -> Groups:
    """Groups (tokens, n_scored) pairs by their prefix. With share=False, and for sequences without a prefix (a
    rolling window from its document's start), every distinct sequence is a group of its own."""
    index: dict[tuple[bytes, int], int] = {}
    unique, owner = [], []
    for s, n in seqs:
        owner.append(index.setdefault((s.tobytes(), n), len(unique)))
        if owner[-1] == len(unique):
            unique.append((s, n))
    by_prefix: dict[bytes, int] = {}
    prefixes, branches = [], []
    for u, (s, n) in enumerate(unique):
        p = len(s) - n - 1
        g = by_prefix.setdefault(s[:p].tobytes(), len(prefixes)) if share and p else len(prefixes)
        if g == len(prefixes):
            prefixes.append(p)
            branches.append([])
        branches[g].append(u)
    return Groups(unique, owner, prefixes, branches)


def bucket_length(n: int, cap: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them) holding n, at most `cap`."""
    size = 16
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size, cap)


def pack(groups: Sequence[tuple[int, Sequence[int]]], row_len: int) -> list[list[Segment]]:
    """Rows of segments for groups given as (prefix length, branch lengths); every prefix + branch <= row_len.

    Best-fit decreasing: each group that fits a row goes whole into the fullest row with room for it (longest first);
    then each group that does not is split branch by branch (longest first), each branch going into the fullest row
    already holding the group's prefix, else into the fullest row with room for prefix and branch, else a new row.
    Groups with the longest prefixes are split first, so short-prefix branches fill the gaps left.
    """
    rows: list[list[Segment]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted; rows being filled by a split group are not in it

    def take(need: int) -> tuple[int, int]:
        at = bisect.bisect_left(rooms, (need, -1))
        if at < len(rooms):
            return rooms.pop(at)
        rows.append([])
        return row_len, len(rows) - 1

    totals = [p + sum(b) for p, b in groups]
    whole = sorted((g for g in range(len(groups)) if totals[g] <= row_len), key=lambda g: -totals[g])
    split = sorted((g for g in range(len(groups)) if totals[g] > row_len), key=lambda g: -groups[g][0])
    for g in whole:
        room, r = take(totals[g])
        rows[r].append((g, list(range(len(groups[g][1])))))
        bisect.insort(rooms, (room - totals[g], r))
    for g in split:
        prefix, lengths = groups[g]
        held, segments = [], []  # held: sorted (room left, k) of the rows holding this prefix; segments[k]: (row, seg)
        for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
            at = bisect.bisect_left(held, (lengths[b], -1))
            if at < len(held):
                room, k = held.pop(at)
            else:
                room, r = take(prefix + lengths[b])
                room, k = room - prefix, len(segments)
                segments.append((r, (g, [])))
                rows[r].append(segments[k][1])
            segments[k][1][1].append(b)
            bisect.insort(held, (room - lengths[b], k))
        for room, k in held:
            bisect.insort(rooms, (room, segments[k][0]))
    return rows


def choose_rows(groups: Sequence[tuple[int, Sequence[int]]], min_row: int, cap: int) -> tuple[int, list]:
    """The row length (a bucket from the longest sequence's up to min_row) that packs into the fewest tokens."""
    best = None
    size = bucket_length(max(p + max(b) for p, b in groups), cap)
    while True:
        rows = pack(groups, size)
        if best is None or len(rows) * size < len(best[1]) * best[0]:
            best = (size, rows)
        if size >= min(max(min_row, 16), cap):
            return best
        size = bucket_length(size + 1, cap)


def build(grouped: Groups, rows: Sequence[list[Segment]], n_rows: int, row_len: int):
    """(tokens, targets, positions, segment_ids, branch_ids) arrays of shape (n_rows, row_len), and for each distinct
    sequence laid out here (row, start, end) of its scored targets."""
    shape = (n_rows, row_len)
    tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    positions, segments, branch_ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    spans = {}
    for r, row in enumerate(rows):
        at = 0
        for k, (g, members) in enumerate(row):
            p = grouped.prefixes[g]
            u = grouped.branches[g][members[0]]
            tokens[r, at:at + p], positions[r, at:at + p] = grouped.unique[u][0][:p], np.arange(p)
            segments[r, at:at + p] = k + 1
            at += p
            for j, b in enumerate(members):
                u = grouped.branches[g][b]
                s, n = grouped.unique[u]
                tokens[r, at:at + n], targets[r, at:at + n] = s[p:p + n], s[p + 1:]
                positions[r, at:at + n] = np.arange(p, p + n)  # continuing from the prefix
                segments[r, at:at + n], branch_ids[r, at:at + n] = k + 1, j + 1
                spans[u] = (r, at, at + n)
                at += n
    return (tokens, targets, positions, segments, branch_ids), spans
