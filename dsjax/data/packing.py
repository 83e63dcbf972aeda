"""Packing: a stream of documents -> rows of exactly seq_len next-token pairs, with an exact, JSON-safe state.

A document d = [bos, ..., eos] holds the pairs (d[j], d[j+1]); pairs fill rows in stream order (concatenate, then
split), so nothing is padded except the end of a finite stream and every pair is trained on exactly once. A row is
a dict of (seq_len,) arrays:

  tokens, targets   the pairs; a target is always the next token of the same document, never across a boundary
  segment_ids       1, 2, ... for the documents (or pieces of a long one) in the row; 0 on padding
  positions         restart at 0 in each segment
  loss_weights      1.0 on every pair, 0.0 on padding

Attention must stay within a segment (the model's attention takes `segment_ids`); a document split across rows
continues in the next row as a new segment, positions from 0.

Documents arrive in chunks (lists), because reading many records at once is what makes loading fast (records.py).
The state, taken between rows, is the parent's state before the current chunk plus the document and offset within
it: plain ints, so it survives JSON (grain's ConcatThenSplit keeps tuples there that JSON turns into lists, and then
restores the wrong rows), and restoring reads one chunk again instead of replaying the stream.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

FIELDS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of nothing but padding."""
    return {
        "tokens": np.full(seq_len, pad_id, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "loss_weights": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }


class PackedRowsIterDataset(grain.IterDataset):
    """Chunks of documents (lists of 1-D int32 arrays, read together for speed) -> packed rows of `seq_len` pairs."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
        super().__init__(parent)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}.")
        self._seq_len, self._pad_id = seq_len, pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset(seq_len={self._seq_len})"


class _PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len, self._pad_id = seq_len, pad_id
        self._arange = np.arange(seq_len, dtype=np.int32)
        self._chunk: list[np.ndarray] | None = None  # the chunk being packed
        self._chunk_parent_state: dict | None = None  # the parent's state just before that chunk
        self._doc = 0  # its document being packed
        self._offset = 0  # pairs of that document already emitted

    def _current_document(self) -> np.ndarray | None:
        """The document to pack from, reading the next chunk when this one is used up; None at the end."""
        while self._chunk is None or self._doc == len(self._chunk):
            parent_state = self._parent.get_state()
            try:
                chunk = next(self._parent)
            except StopIteration:
                self._chunk = None
                return None
            self._chunk, self._chunk_parent_state, self._doc, self._offset = chunk, parent_state, 0, 0
        return self._chunk[self._doc]

    def __next__(self) -> dict[str, np.ndarray]:
        row = empty_row(self._seq_len, self._pad_id)
        filled, segment = 0, 0
        while filled < self._seq_len:
            doc = self._current_document()
            if doc is None:
                break
            start = self._offset
            take = min(len(doc) - 1 - start, self._seq_len - filled)
            if take > 0:
                end = filled + take
                segment += 1
                row["tokens"][filled:end] = doc[start : start + take]
                row["targets"][filled:end] = doc[start + 1 : start + take + 1]
                row["segment_ids"][filled:end] = segment
                row["positions"][filled:end] = self._arange[:take]
                row["loss_weights"][filled:end] = 1.0
                filled = end
                self._offset = start + take
            if self._offset >= len(doc) - 1:  # done with it (a document of fewer than 2 tokens has no pair)
                self._doc, self._offset = self._doc + 1, 0
        if filled == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._chunk is None or self._doc == len(self._chunk):
            return {"parent": self._parent.get_state(), "doc": -1, "offset": 0}
        return {"parent": self._chunk_parent_state, "doc": self._doc, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._chunk, self._chunk_parent_state, self._doc, self._offset = None, None, 0, 0
        if state["doc"] >= 0:
            self._chunk = next(self._parent)
            self._chunk_parent_state, self._doc, self._offset = state["parent"], state["doc"], state["offset"]
