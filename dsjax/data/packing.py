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

import dataclasses
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
        return self._fill(self._plan())

    def _plan(self) -> list:
        """Advances over the next row's documents by their shapes alone: the row's pieces (doc, start, take)."""
        pieces, filled = [], 0
        while filled < self._seq_len:
            doc = self._current_document()
            if doc is None:
                break
            start = self._offset
            take = min(doc.shape[-1] - 1 - start, self._seq_len - filled)
            if take > 0:
                pieces.append((doc, start, take))
                filled += take
                self._offset = start + take
            if self._offset >= doc.shape[-1] - 1:  # done with it (a document of fewer than 2 tokens has no pair)
                self._doc, self._offset = self._doc + 1, 0
        if not pieces:
            raise StopIteration
        return pieces

    def _fill(self, pieces: list) -> dict[str, np.ndarray]:
        """The row of planned pieces, each doc now an array."""
        row = empty_row(self._seq_len, self._pad_id)
        filled = 0
        for segment, (doc, start, take) in enumerate(pieces, start=1):
            end = filled + take
            row["tokens"][filled:end] = doc[start : start + take]
            row["targets"][filled:end] = doc[start + 1 : start + take + 1]
            row["segment_ids"][filled:end] = segment
            row["positions"][filled:end] = self._arange[:take]
            row["loss_weights"][filled:end] = 1.0
            filled = end
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


class PackedConversationsIterDataset(grain.IterDataset):
    """Chunks of conversations ((2, n) int32 arrays: token ids, per-token loss weights) -> rows of `seq_len` pairs.

    Unlike documents, a conversation is never split across rows: a piece without its prompt would train answers on
    questions the model cannot see. Rows fill in stream order (next fit): a conversation that does not fit in what
    is left of a row starts the next one, and the rest of the row is padding. With `packing=False` every row holds
    one conversation. One longer than seq_len + 1 tokens keeps its first seq_len pairs (prepare --max_len cuts them
    beforehand, counted). The row layout is `empty_row`'s, except:

      loss_weights  the stored weight of each pair's target token: 1 where the target is an assistant token or the
                    eos closing an assistant turn (chat.py), 0 on prompt targets and padding
      segment_ids   1, 2, ... per conversation, 0 on padding; positions restart at 0 in each

    so the first token of a conversation (bos) is never a target, of the previous one or any other. The state is the
    same JSON dict as for documents (offset is always 0).
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int, packing: bool = True):
        super().__init__(parent)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}.")
        self._seq_len, self._pad_id, self._packing = seq_len, pad_id, packing

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedConversationsIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._packing)

    def __str__(self) -> str:
        return f"PackedConversationsIterDataset(seq_len={self._seq_len}, packing={self._packing})"


def conversation_rows(lengths, seq_len: int, packing: bool = True) -> int:
    """Rows that PackedConversationsIterDataset makes of conversations of these token lengths, in this order."""
    rows, filled = 0, seq_len
    for n in lengths:
        pairs = min(int(n) - 1, seq_len)
        if pairs <= 0:
            continue
        if not packing or filled + pairs > seq_len:
            rows, filled = rows + 1, 0
        filled += pairs
    return rows


class _PackedConversationsIterator(_PackedRowsIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, packing: bool):
        super().__init__(parent, seq_len, pad_id)
        self._packing = packing

    def _plan(self) -> list:
        pieces, filled = [], 0
        while filled < self._seq_len and not (pieces and not self._packing):
            conv = self._current_document()
            if conv is None:
                break
            take = min(conv.shape[-1] - 1, self._seq_len)
            if take > 0:
                if filled + take > self._seq_len:
                    break  # it starts the next row
                pieces.append((conv, take))
                filled += take
            self._doc, self._offset = self._doc + 1, 0
        if not pieces:
            raise StopIteration
        return pieces

    def _fill(self, pieces: list) -> dict[str, np.ndarray]:
        row = empty_row(self._seq_len, self._pad_id)
        filled = 0
        for segment, (conv, take) in enumerate(pieces, start=1):
            end = filled + take
            row["tokens"][filled:end] = conv[0, :take]
            row["targets"][filled:end] = conv[0, 1 : take + 1]
            row["loss_weights"][filled:end] = conv[1, 1 : take + 1]
            row["segment_ids"][filled:end] = segment
            row["positions"][filled:end] = self._arange[:take]
            filled = end
        return row


class PackedPairsIterDataset(grain.IterDataset):
    """Chunks of preference pairs (a (2, n) record: the chosen conversation, then the rejected one from its own bos)
    -> row pairs for DPO: each item is a dict of (2, seq_len) arrays, [0] the chosen row and [1] the rejected row.

    The two rows are packed in step (next fit, whole conversations, as PackedConversationsIterDataset): a pair goes
    in when its chosen conversation fits the chosen row and its rejected one the rejected row, and it gets the same
    segment id in both. So segment s of the chosen row and segment s of the rejected row are the two responses of
    one pair; their loss_weights mark the reply tokens and eos whose log-probs DPO sums (no prompt token). With
    `packing=False` each row pair holds one pair.
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int, bos_id: int, packing: bool = True):
        super().__init__(parent)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}.")
        self._seq_len, self._pad_id, self._bos_id, self._packing = seq_len, pad_id, bos_id, packing

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedPairsIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._bos_id, self._packing)

    def __str__(self) -> str:
        return f"PackedPairsIterDataset(seq_len={self._seq_len}, packing={self._packing})"


def _second_bos(record: np.ndarray, bos_id: int) -> int:
    return int(np.flatnonzero(record[0] == bos_id)[1])


def split_pair(record: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A pair record -> (chosen, rejected) (2, n) arrays, split where the second bos starts the rejected one."""
    second = _second_bos(record, bos_id)
    return record[:, :second], record[:, second:]


def pair_rows(pair_lengths, seq_len: int, packing: bool = True) -> int:
    """Row pairs that PackedPairsIterDataset makes of pairs with these (chosen, rejected) token lengths."""
    rows, filled = 0, (seq_len, seq_len)
    for nc, nr in pair_lengths:
        take = (min(int(nc) - 1, seq_len), min(int(nr) - 1, seq_len))
        if not packing or filled[0] + take[0] > seq_len or filled[1] + take[1] > seq_len:
            rows, filled = rows + 1, (0, 0)
        filled = (filled[0] + take[0], filled[1] + take[1])
    return rows


class _PackedPairsIterator(_PackedRowsIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, bos_id: int, packing: bool):
        super().__init__(parent, seq_len, pad_id)
        self._bos_id, self._packing = bos_id, packing

    def _plan(self) -> list:
        pieces, filled = [], (0, 0)
        while not (pieces and not self._packing):
            record = self._current_document()
            if record is None:
                break
            split = record.split if isinstance(record, Stub) else _second_bos(record, self._bos_id)
            takes = (min(split - 1, self._seq_len), min(record.shape[-1] - split - 1, self._seq_len))
            if any(f + t > self._seq_len for f, t in zip(filled, takes)):
                break  # it starts the next row pair
            pieces.append((record, split, takes))
            filled = (filled[0] + takes[0], filled[1] + takes[1])
            self._doc, self._offset = self._doc + 1, 0
        if not pieces:
            raise StopIteration
        return pieces

    def _fill(self, pieces: list) -> dict[str, np.ndarray]:
        halves = [empty_row(self._seq_len, self._pad_id) for _ in range(2)]
        filled = [0, 0]
        for segment, (record, split, takes) in enumerate(pieces, start=1):
            for i, (side, take) in enumerate(zip((record[:, :split], record[:, split:]), takes)):
                row, start, end = halves[i], filled[i], filled[i] + take
                row["tokens"][start:end] = side[0, :take]
                row["targets"][start:end] = side[0, 1 : take + 1]
                row["loss_weights"][start:end] = side[1, 1 : take + 1]
                row["segment_ids"][start:end] = segment
                row["positions"][start:end] = self._arange[:take]
                filled[i] = end
        return {k: np.stack([halves[0][k], halves[1][k]]) for k in FIELDS}


# ------------------------------------------------------------------------------------------- one process's share


@dataclasses.dataclass(frozen=True)
class Stub:
    """A record known by its key and shape alone (from the prepared lengths), read only if a kept row needs it.
    `split`: where a preference record's rejected half starts (its chosen length)."""

    key: tuple[int, int]
    shape: tuple[int, ...]
    split: int | None = None


class ShardedBatchesIterDataset(grain.IterDataset):
    """Global batches of `per_batch` packed items (rows, or row pairs) of which this process keeps items [lo, hi).

    Every process plans every item of the global stream from the records' shapes (cheap: no reading), so row r of
    global batch t is the same on every process count; it reads, with one call per batch, only the records that its
    own items hold (`load`: stubs -> arrays), and the shares of all processes concatenate to the single-process
    batch. The state is the packer's, taken between global batches, so it is the same on every process and a run
    resumes on any number of them.
    """

    def __init__(self, packed: grain.IterDataset, *, per_batch: int, keep: tuple[int, int], load):
        super().__init__(packed)
        self._per_batch, self._keep, self._load = per_batch, keep, load

    def __iter__(self) -> grain.DatasetIterator:
        return _ShardedBatchesIterator(self._parent.__iter__(), self._per_batch, self._keep, self._load)

    def __str__(self) -> str:
        return f"ShardedBatchesIterDataset(per_batch={self._per_batch}, keep={self._keep})"


class _ShardedBatchesIterator(grain.DatasetIterator):
    def __init__(self, packer: _PackedRowsIterator, per_batch: int, keep: tuple[int, int], load):
        super().__init__(packer)
        self._per_batch, (self._lo, self._hi), self._load = per_batch, keep, load
        self._loaded: dict[Stub, np.ndarray] = {}  # the records of the last batch

    def __next__(self) -> dict[str, np.ndarray]:
        kept = []
        for item in range(self._per_batch):
            try:
                pieces = self._parent._plan()
            except StopIteration:
                break
            if self._lo <= item < self._hi:
                kept.append(pieces)
        if not kept:
            raise StopIteration
        stubs = dict.fromkeys(p[0] for pieces in kept for p in pieces if isinstance(p[0], Stub))
        # A long document continues over several batches: keep the last batch's records, read each one once.
        missing = [stub for stub in stubs if stub not in self._loaded]
        arrays = {stub: self._loaded[stub] for stub in stubs if stub in self._loaded}
        arrays.update(zip(missing, self._load(missing)) if missing else ())
        self._loaded = arrays
        rows = [self._parent._fill([(arrays[p[0]] if isinstance(p[0], Stub) else p[0], *p[1:]) for p in pieces])
                for pieces in kept]
        return {k: np.stack([row[k] for row in rows]) for k in FIELDS}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
