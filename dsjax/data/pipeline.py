"""The grain loader: prepared datasets -> shuffled, mixed, per-process, packed batches, with an exact JSON state.

    loader = make_loader(config, "train", seq_len=256, global_batch_size=16)
    batch = next(loader)        # numpy (rows, seq_len): tokens, targets, loss_weights, segment_ids, positions
    state = loader.get_state()  # JSON-serializable; a new loader given set_state(state) continues exactly

Stages: grain works out which document comes when (a record index per dataset -> global shuffle by seed, a new
order every epoch -> weighted mixture, mixture.py); then chunks of 32 documents are read from the ArrayRecord shards
in threads (records.py) -> packing (packing.py) -> global batches of global_batch_size rows, of which this process
keeps rows [process_index * rows, (process_index + 1) * rows), rows = global_batch_size // process_count. With
several processes each one plans every row from the prepared lengths but reads only the records its own rows hold
(packing.ShardedBatchesIterDataset), so the processes' shares concatenate to the single-process batch, and the
loader state (the same on every process) resumes on any process count. Packing runs in the caller's thread, which
overlaps the device anyway: JAX dispatches a train step asynchronously.
"train" is shuffled and endless unless num_epochs is given; "val" is one pass in stored order, padded with empty
batches so that every process yields the same number (`num_batches`), as multi-host evaluation needs.

Chat datasets (prepare --format=chat) go through the same stages and give the same batch dict; their records are
conversations with per-token loss weights, packed whole (packing.PackedConversationsIterDataset): `loss_weights`
is 1 exactly where the target is a trained assistant token, several conversations share a row unless
`packing=False` (one per row, padded). `Loader.data_format` says which kind a loader reads; a mixture needs one.

Preference datasets (prepare --format=preference, for DPO) give the same five keys in row pairs: rows 2k and 2k+1
of every batch are the chosen and the rejected row of the same pairs, packed in step, and segment s of row 2k and
segment s of row 2k+1 are the chosen and rejected responses of one pair (packing.PackedPairsIterDataset). So the
pair of a token is (row // 2, segment id), `batch[k].reshape(-1, 2, seq_len)` puts chosen at [:, 0] and rejected
at [:, 1], a response's log-probability is the sum of log p(target) * loss_weights over its segment, and pairs never
straddle processes or devices as long as each holds an even number of rows (global_batch_size counts rows: it must
be even per process; with packing=False a batch holds global_batch_size / 2 pairs). Padding rows come in pairs too.

The `data` config keys read here (defaults in dsjax/config.py `_data_defaults`):
  data.datasets     "builtin" (the stdlib corpus, see corpus.py) or comma-separated prepared dataset directories
  data.weights      comma-separated shares of training tokens, one per dataset; None: each in proportion to its size
  data.tokenizer    optional tokenizer file; the datasets must have been prepared with it
  data.seed         shuffle seed; None: the top-level `seed`
  data.num_threads  threads that read and decode documents
  data.cache_dir, data.builtin_vocab_size, data.builtin_val_fraction   (the built-in corpus, corpus.py)
and model.vocab_size, which must hold the tokenizer's ids.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from pathlib import Path
from typing import Any

import grain
import numpy as np

from dsjax.data import corpus, mixture, packing, prepare, records
from dsjax.data import packing as packing_module  # make_loader's `packing` argument shadows the module name
from dsjax.errors import DataError
from dsjax.data.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer
from dsjax.errors import ConfigError

SPLITS = prepare.SPLITS
_CHUNK = 32  # documents read per ArrayRecord call (see records.py)
_READ_AHEAD = 4  # chunks read ahead by the reader threads


@dataclasses.dataclass(frozen=True)
class Source:
    """One prepared dataset of the config and its (token-share) mixture weight."""

    dir: Path
    manifest: dict
    weight: float | None


def resolve_sources(config) -> list[Source]:
    """The prepared datasets that config.data names, checked: one tokenizer, and one that fits the model."""
    data = config.data
    names = [name.strip() for name in str(data.datasets or "").split(",") if name.strip()]
    if not names:
        raise ConfigError("data.datasets is empty; set it to 'builtin' or to prepared dataset directories.")
    weights = mixture.parse_weights(data.weights, len(names)) or [None] * len(names)
    dirs = [Path(corpus.ensure_builtin(config)["dir"]) if n == "builtin" else Path(n).expanduser() for n in names]
    sources = [Source(d, prepare.read_manifest(d), w) for d, w in zip(dirs, weights)]
    first = sources[0]
    fingerprint = first.manifest["tokenizer"]["fingerprint"]
    for source in sources[1:]:
        if source.manifest["tokenizer"]["fingerprint"] != fingerprint:
            raise DataError(f"{source.dir} was prepared with another tokenizer than {first.dir}; a mixture needs one.")
    if data.tokenizer and load_tokenizer(data.tokenizer).fingerprint != fingerprint:
        raise ConfigError(f"data.tokenizer={data.tokenizer} is not the tokenizer {first.dir} was prepared with.")
    check_vocab_fits(first.manifest["tokenizer"]["vocab_size"], config.model.vocab_size, tokenizer_path(sources))
    return sources


def tokenizer_path(sources: list[Source]) -> Path:
    """The tokenizer file that the datasets carry (prepare copies it in)."""
    return sources[0].dir / sources[0].manifest["tokenizer"]["file"]


def load_config_tokenizer(config) -> Tokenizer:
    """The tokenizer of the config's datasets, for decoding samples."""
    return load_tokenizer(tokenizer_path(resolve_sources(config)))


def source_format(sources: list[Source]) -> str:
    """"text", "chat" or "preference", the same for every dataset of a mixture."""
    formats = {prepare.data_format(s.manifest) for s in sources}
    if len(formats) > 1:
        raise DataError(f"data.datasets mixes {' and '.join(sorted(formats))} datasets; a mixture needs one format.")
    return formats.pop()


def split_stats(sources: list[Source], split: str) -> dict[str, int]:
    """documents, tokens, targets and UTF-8 bytes of a split over all datasets (bits-per-byte needs targets, bytes)."""
    keys = ("documents", "tokens", "targets", "bytes")
    return {k: sum(s.manifest["splits"][split][k] for s in sources) for k in keys}


def eval_bytes_per_token(config) -> float:
    """UTF-8 bytes per predicted token of the val split: bits-per-byte = mean loss in nats / ln 2 / this."""
    stats = split_stats(resolve_sources(config), "val")
    if not stats["targets"]:
        raise DataError(f"data.datasets={config.data.datasets} has no val documents to measure bits-per-byte on.")
    return stats["bytes"] / stats["targets"]


def _sub_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _key(dataset: int, record: int) -> tuple[int, int]:
    return dataset, record


def _document_stream(
    sizes: list[int],
    proportions: list[float],
    *,
    split: str,
    seed: int,
    num_epochs: int | None,
) -> grain.MapDataset:
    """Which (dataset, record) comes when, the same on every process: index arithmetic only, no reading."""
    parts = [grain.MapDataset.range(n).map(functools.partial(_key, i)) for i, n in enumerate(sizes)]
    if split == "val":
        return grain.MapDataset.concatenate(parts).repeat(num_epochs)
    shuffled = [part.shuffle(seed=_sub_seed(seed, i)).repeat(num_epochs) for i, part in enumerate(parts)]
    return shuffled[0] if len(shuffled) == 1 else grain.MapDataset.mix(shuffled, proportions)


class _Stubs:
    """Chunks of keys -> packing.Stub records (shapes from the prepared lengths), for a process that reads only
    the records its own rows hold."""

    def __init__(self, lengths: list[np.ndarray], fmt: str):
        self.lengths, self.fmt = lengths, fmt

    def __call__(self, keys: list[tuple[int, int]]) -> list[packing.Stub]:
        out = []
        for dataset, record in keys:
            n = self.lengths[dataset][record]
            if self.fmt == "text":
                out.append(packing.Stub((dataset, record), (int(n),)))
            elif self.fmt == "chat":
                out.append(packing.Stub((dataset, record), (2, int(n))))
            else:
                out.append(packing.Stub((dataset, record), (2, int(n[0]) + int(n[1])), split=int(n[0])))
        return out


class Loader:
    """An iterator of batches with get_state/set_state; a finite pass pads up to `num_batches` on every process.

    Attributes: rows (per batch, this process), seq_len, num_batches (None when endless), stats (the whole split:
    documents, tokens, targets, bytes), tokenizer_path, data_format ("text", "chat" or "preference").
    """

    def __init__(self, dataset: grain.IterDataset, reader: records.DocumentReader, *, rows, seq_len, pad_id,
                 num_batches, stats, tokenizer_path, data_format="text"):
        self.rows, self.seq_len, self.num_batches, self.data_format = rows, seq_len, num_batches, data_format
        self.stats, self.tokenizer_path = stats, tokenizer_path
        self._empty = packing.empty_row(seq_len, pad_id)
        self._iterator = iter(dataset)
        self._emitted = 0
        # Stop the reader threads and close the files when the loader goes away or the interpreter exits (before
        # its teardown, where grain's own __del__ would fail noisily).
        self._finalizer = weakref.finalize(self, _close, self._iterator, reader)

    def close(self) -> None:
        self._finalizer()

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._emitted >= self.num_batches:
            raise StopIteration
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.num_batches is None:
                raise
            batch = None
        self._emitted += 1
        return self._padded(batch)

    def _padded(self, batch: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        have = 0 if batch is None else len(batch["tokens"])
        if have == self.rows:
            return batch
        fill = {k: np.repeat(v[None], self.rows - have, axis=0) for k, v in self._empty.items()}
        return fill if batch is None else {k: np.concatenate([batch[k], fill[k]]) for k in packing.FIELDS}

    def get_state(self) -> dict[str, Any]:
        return {"iterator": self._iterator.get_state(), "batches": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state["iterator"])
        self._emitted = state["batches"]


def _close(iterator: grain.DatasetIterator, reader: records.DocumentReader) -> None:
    iterator.close()
    reader.close()


def make_loader(
    config,
    split: str,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    num_epochs: int | None = None,
    packing: bool = True,
) -> Loader:
    """Batches of `global_batch_size // process_count` packed rows for this process; see the module docstring.

    num_epochs None: endless for "train", one pass for "val". seed None: data.seed, else the top-level seed.
    packing False (chat and preference datasets only): one conversation (or pair, in a row pair) per row, padded.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} does not split evenly over {process_count} processes."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    seed = seed if seed is not None else (config.data.seed if config.data.seed is not None else config.seed)
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"the data shuffle seed (data.seed, else seed) must be a non-negative integer, got {seed!r}.")
    if split == "val" and num_epochs is None:
        num_epochs = 1
    sources = resolve_sources(config)
    fmt = source_format(sources)
    if fmt == "text" and not packing:
        raise ConfigError(f"packing=False (one conversation per row) needs chat or preference datasets; "
                          f"{sources[0].dir} is text.")
    rows = global_batch_size // process_count
    if fmt == "preference" and rows % 2:
        raise ConfigError(f"a preference batch holds row pairs, so global_batch_size={global_batch_size} must give "
                          f"an even number of rows per process, not {rows}.")
    for source in sources:
        if not source.manifest["splits"][split]["documents"]:
            fix = ("prepare it again with a larger --val_fraction, or set eval.every_steps=0 to train without "
                   "held-out evaluation" if split == "val" else "prepare it again")
            raise DataError(f"{source.dir} has no {split} documents (it was prepared with "
                            f"--val_fraction={source.manifest.get('val_fraction')}); {fix}.")
    proportions = mixture.document_proportions(
        [s.weight for s in sources] if sources[0].weight is not None else None,
        [s.manifest["splits"][split] for s in sources],
    )
    sizes = [s.manifest["splits"][split]["documents"] for s in sources]
    stream = _document_stream(sizes, proportions, split=split, seed=seed, num_epochs=num_epochs)
    reader = records.DocumentReader(
        [[s.dir / shard for shard in s.manifest["splits"][split]["shards"]] for s in sources],
        np.dtype(sources[0].manifest["token_dtype"]),
        weighted=fmt != "text",
    )
    for i, source in enumerate(sources):
        if reader.num_records(i) != sizes[i]:
            raise DataError(f"{source.dir} holds {reader.num_records(i)} {split} records but its manifest lists "
                            f"{sizes[i]}; prepare it again.")
    key = "pair_lengths" if fmt == "preference" else "lengths"
    lengths = [np.load(s.dir / s.manifest["splits"][split][key], mmap_mode="r") for s in sources]
    # One process reads whole chunks ahead in threads; of several, each plans every row from the lengths and reads
    # only the records of its own rows (packing.ShardedBatchesIterDataset).
    threads = int(config.data.num_threads)
    chunks = stream.batch(_CHUNK, batch_fn=list).map(reader.read if process_count == 1 else _Stubs(lengths, fmt))
    read = chunks.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=_READ_AHEAD if threads else 0)
    )
    pad_id = sources[0].manifest["tokenizer"]["pad_id"]
    if fmt == "text":
        packed = packing_module.PackedRowsIterDataset(read, seq_len=seq_len, pad_id=pad_id)
    elif fmt == "chat":
        packed = packing_module.PackedConversationsIterDataset(read, seq_len=seq_len, pad_id=pad_id, packing=packing)
    else:
        packed = packing_module.PackedPairsIterDataset(read, seq_len=seq_len, pad_id=pad_id, packing=packing,
                                                       bos_id=sources[0].manifest["tokenizer"]["bos_id"])
    per_item = 2 if fmt == "preference" else 1  # a preference item is a row pair
    mine = rows // per_item
    batches = packing_module.ShardedBatchesIterDataset(
        packed, per_batch=global_batch_size // per_item, keep=(process_index * mine, (process_index + 1) * mine),
        load=lambda stubs: reader.read([stub.key for stub in stubs]))
    if fmt == "preference":
        batches = batches.map(_interleave_pairs)
    num_batches = None
    if num_epochs is not None:
        count = {"text": _count_batches,
                 "chat": functools.partial(_count_conversation_batches, packing=packing),
                 "preference": functools.partial(_count_pair_batches, packing=packing)}[fmt]
        num_batches = count(stream, lengths, seq_len, global_batch_size)
    return Loader(batches, reader, rows=rows, seq_len=seq_len, pad_id=pad_id, num_batches=num_batches,
                  stats=split_stats(sources, split), tokenizer_path=tokenizer_path(sources), data_format=fmt)


def _interleave_pairs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(pairs, 2, seq_len) row pairs -> (2 * pairs, seq_len): chosen rows even, rejected rows odd."""
    return {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}


def _count_pair_batches(stream: grain.MapDataset, pair_lengths: list[np.ndarray], seq_len: int, rows: int, *,
                        packing: bool) -> int:
    """Batches of row pairs that pair packing makes of this stream (packing.pair_rows over its pair lengths)."""
    ordered = (pair_lengths[dataset][record] for dataset, record in (stream[i] for i in range(len(stream))))
    return math.ceil(2 * packing_module.pair_rows(ordered, seq_len, packing) / rows)


def _count_conversation_batches(stream: grain.MapDataset, lengths: list[np.ndarray], seq_len: int, rows: int, *,
                                packing: bool) -> int:
    """Batches that conversation packing makes of this stream (packing.conversation_rows over its lengths)."""
    ordered = (lengths[dataset][record] for dataset, record in (stream[i] for i in range(len(stream))))
    return math.ceil(packing_module.conversation_rows(ordered, seq_len, packing) / rows)


def _count_batches(stream: grain.MapDataset, lengths: list[np.ndarray], seq_len: int, rows: int) -> int:
    """Batches that packing makes of this stream: its pairs fill rows exactly, only the last row is partial."""
    pairs = 0
    for i in range(len(stream)):
        dataset, record = stream[i]
        pairs += max(int(lengths[dataset][record]) - 1, 0)
    return math.ceil(math.ceil(pairs / seq_len) / rows)
