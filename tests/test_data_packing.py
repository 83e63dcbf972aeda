"""Packing: rows checked against a hand-packed example, every pair exactly once, exact resume from every row."""

import json

import grain
import numpy as np

from dsjax.data.packing import PackedRowsIterDataset
from tests.test_data_common import batch_pair_codes, pair_codes

PAD = 0


def _rows(docs, seq_len, chunk=3):
    docs = grain.MapDataset.source([np.asarray(d, np.int32) for d in docs])
    return PackedRowsIterDataset(docs.batch(chunk, batch_fn=list).to_iter_dataset(), seq_len=seq_len, pad_id=PAD)


def test_hand_packed_example():
    rows = list(_rows([[1, 2, 3, 4, 5], [6, 7, 8], [9, 10], [11]], seq_len=3, chunk=2))
    expected = [
        # tokens, targets, segment_ids, positions, loss_weights
        ([1, 2, 3], [2, 3, 4], [1, 1, 1], [0, 1, 2], [1, 1, 1]),
        ([4, 6, 7], [5, 7, 8], [1, 2, 2], [0, 0, 1], [1, 1, 1]),  # the end of doc 1, then doc 2
        ([9, PAD, PAD], [10, PAD, PAD], [1, 0, 0], [0, 0, 0], [1, 0, 0]),  # doc 3, padding; [11] has no pair
    ]
    assert len(rows) == len(expected)
    for row, (tokens, targets, segments, positions, weights) in zip(rows, expected):
        assert row["tokens"].tolist() == tokens and row["targets"].tolist() == targets
        assert row["segment_ids"].tolist() == segments and row["positions"].tolist() == positions
        assert row["loss_weights"].tolist() == weights
        assert {k: v.dtype for k, v in row.items()} == {
            "tokens": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
            "loss_weights": np.float32,
        }


def test_every_pair_once_and_never_across_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=int(n)) for n in rng.integers(1, 90, size=200)]
    rows = list(_rows(docs, seq_len=32))
    vocab = 1000
    # Every (token, next token) pair of every document, exactly once: a target never comes from another document.
    assert np.array_equal(batch_pair_codes(rows, vocab), pair_codes(docs, vocab))
    assert sum(r["loss_weights"].sum() for r in rows) == sum(len(d) - 1 for d in docs)
    # Only the last row has padding; inside a segment, positions count up from 0 and tokens chain into targets.
    for row in rows[:-1]:
        assert row["loss_weights"].all()
    for row in rows:
        seg, pos = row["segment_ids"], row["positions"]
        starts = np.flatnonzero(np.diff(seg, prepend=-1) != 0)
        for s in starts:
            if seg[s]:
                assert pos[s] == 0
        same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
        assert np.array_equal(row["tokens"][1:][same], row["targets"][:-1][same])
        assert np.array_equal(pos[1:][same], pos[:-1][same] + 1)


def test_resume_from_every_row_after_json():
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 50, size=int(n)) for n in rng.integers(0, 40, size=60)]  # some without any pair
    uninterrupted = list(_rows(docs, seq_len=16))
    for stop in range(len(uninterrupted) + 1):
        it = iter(_rows(docs, seq_len=16))
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = iter(_rows(docs, seq_len=16))
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(uninterrupted) - stop
        for a, b in zip(rest, uninterrupted[stop:]):
            assert all(np.array_equal(a[k], b[k]) for k in a)
