"""The loader: batch format, exact resume from any stop point, seeds, per-process shares, val passes, mixtures."""

import json

import numpy as np
import pytest

from dsjax.config import default_config
from dsjax.data import mixture, pipeline, prepare
from dsjax.errors import DataError
from dsjax.errors import ConfigError
from tests.test_data_common import (
    batch_pair_codes, pair_codes, read_split, stdlib_texts, train_small_tokenizer, write_jsonl,
)

SEQ, BATCH = 64, 4


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two prepared datasets with one tokenizer: whole source files (long) and their paragraphs (short)."""
    root = tmp_path_factory.mktemp("datasets")
    tok = train_small_tokenizer(root)
    files = stdlib_texts(30)
    paragraphs = [p for text in stdlib_texts(40)[30:] for p in text.split("\n\n") if p.strip()]
    write_jsonl(root / "files.jsonl", files)
    write_jsonl(root / "paragraphs.jsonl", paragraphs)
    a = root / "files"
    b = root / "paragraphs"
    prepare.prepare([str(root / "files.jsonl")], tok.path, a, val_fraction=0.2, progress=False)
    prepare.prepare([str(root / "paragraphs.jsonl")], tok.path, b, val_fraction=0.2, progress=False)
    return tok, a, b


def _config(*dirs, weights=None, vocab=1024):
    config = default_config()
    config.data.datasets = ",".join(str(d) for d in dirs)
    config.data.weights = weights
    config.model.vocab_size = vocab
    return config


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in pipeline.packing.FIELDS)


def test_batch_format(datasets):
    tok, a, _ = datasets
    loader = pipeline.make_loader(_config(a), "train", seq_len=SEQ, global_batch_size=BATCH)
    batch = next(loader)
    assert set(batch) == {"tokens", "targets", "loss_weights", "segment_ids", "positions"}
    for key, dtype in [("tokens", np.int32), ("targets", np.int32), ("loss_weights", np.float32),
                       ("segment_ids", np.int32), ("positions", np.int32)]:
        assert batch[key].shape == (BATCH, SEQ) and batch[key].dtype == dtype
    assert np.array_equal(batch["loss_weights"], (batch["segment_ids"] > 0).astype(np.float32))
    # Each segment is a contiguous run of some stored document, and targets are its next tokens.
    docs = read_split(a, "train")
    stored = [",".join(map(str, d)) for d in docs]
    for row in range(BATCH):
        for s in np.unique(batch["segment_ids"][row]):
            mask = batch["segment_ids"][row] == s
            run = np.append(batch["tokens"][row][mask], batch["targets"][row][mask][-1])
            assert any(",".join(map(str, run)) in d for d in stored)
    assert loader.tokenizer_path.read_bytes() == tok.path.read_bytes()
    assert loader.num_batches is None and loader.stats == {
        k: prepare.read_manifest(a)["splits"]["train"][k] for k in ("documents", "tokens", "targets", "bytes")
    }


def test_exact_resume_from_every_stop_point(datasets):
    _, a, b = datasets
    config = _config(a, b, weights="0.7,0.3")
    make = lambda: pipeline.make_loader(config, "train", seq_len=SEQ, global_batch_size=2 * BATCH,  # noqa: E731
                                        process_index=1, process_count=2, seed=3)
    total = 12
    uninterrupted = _take(make(), total)
    reused = make()
    for stop in range(total):
        loader = make()
        _take(loader, stop)
        state = json.loads(json.dumps(loader.get_state()))  # what a checkpoint stores
        fresh = make()
        fresh.set_state(state)
        assert _same(_take(fresh, total - stop), uninterrupted[stop:]), f"resume after {stop} batches"
        reused.set_state(state)  # also restores a loader that has run elsewhere meanwhile
        assert _same(_take(reused, min(2, total - stop)), uninterrupted[stop:stop + 2])


def test_seed_decides_the_order(datasets):
    _, a, _ = datasets
    make = lambda seed: pipeline.make_loader(_config(a), "train", seq_len=SEQ, global_batch_size=BATCH,  # noqa: E731
                                             seed=seed)
    assert _same(_take(make(5), 6), _take(make(5), 6))
    assert not _same(_take(make(5), 6), _take(make(6), 6))
    config = _config(a)
    config.data.seed = 5
    config.data.num_threads = 0  # reading in the caller's thread or in reader threads gives the same batches
    assert _same(_take(pipeline.make_loader(config, "train", seq_len=SEQ, global_batch_size=BATCH), 6),
                 _take(make(5), 6))


def test_processes_share_an_epoch_without_overlap(datasets):
    tok, a, _ = datasets
    batches = []
    for p in range(3):
        loader = pipeline.make_loader(_config(a), "train", seq_len=SEQ, global_batch_size=3 * BATCH,
                                      process_index=p, process_count=3, num_epochs=1)
        mine = list(loader)
        assert len(mine) == loader.num_batches  # every process yields the same count
        batches += mine
    # Together the processes train on every pair of every train document exactly once.
    assert np.array_equal(batch_pair_codes(batches, 1024), pair_codes(read_split(a, "train"), 1024))


def test_val_is_one_deterministic_pass(datasets):
    _, a, b = datasets
    config = _config(a, b)
    val_docs = read_split(a, "val") + read_split(b, "val")
    loaders = [pipeline.make_loader(config, "val", seq_len=SEQ, global_batch_size=2 * BATCH, process_index=p,
                                    process_count=2) for p in range(2)]
    passes = [list(loader) for loader in loaders]
    assert len(passes[0]) == len(passes[1]) == loaders[0].num_batches == loaders[1].num_batches
    assert all(b["tokens"].shape == (BATCH, SEQ) for p in passes for b in p)
    stats = loaders[0].stats
    manifests = [prepare.read_manifest(d)["splits"]["val"] for d in (a, b)]
    assert stats["bytes"] == sum(m["bytes"] for m in manifests)
    assert stats["targets"] == sum(len(d) - 1 for d in val_docs)
    assert sum(b["loss_weights"].sum() for p in passes for b in p) == stats["targets"]
    assert pipeline.eval_bytes_per_token(config) == stats["bytes"] / stats["targets"]
    assert np.array_equal(batch_pair_codes(passes[0] + passes[1], 1024), pair_codes(val_docs, 1024))
    again = list(pipeline.make_loader(config, "val", seq_len=SEQ, global_batch_size=2 * BATCH, process_index=0,
                                      process_count=2))
    assert _same(again, passes[0])
    # One process, in stored order: the first rows are the first val document.
    single = next(pipeline.make_loader(config, "val", seq_len=SEQ, global_batch_size=BATCH))
    assert np.array_equal(single["tokens"][0], val_docs[0][:SEQ])


def test_mixture_gives_token_shares():
    # Two sources with 10-token and 100-token documents (by length alone): 80% / 20% of tokens asked.
    stats = [{"documents": 1000, "targets": 10_000}, {"documents": 1000, "targets": 100_000}]
    proportions = mixture.document_proportions([0.8, 0.2], stats)
    stream = pipeline._document_stream([1000, 1000], proportions, split="train", seed=0, num_epochs=None)
    tokens = np.zeros(2)
    for i in range(20_000):
        source, _ = stream[i]
        tokens[source] += (10, 100)[source]
    assert tokens[0] / tokens.sum() == pytest.approx(0.8, abs=0.01)
    assert mixture.document_proportions(None, stats) == [1000.0, 1000.0]


def test_mixture_of_real_datasets_follows_weights(datasets, tmp_path):
    tok, _, b = datasets
    # CJK text is not in the tokenizer's training data, so it encodes to byte pieces only: its tokens are countable.
    rng = np.random.default_rng(0)
    cjk = ["".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, size=int(n))) for n in rng.integers(5, 60, 400)]
    write_jsonl(tmp_path / "cjk.jsonl", cjk)
    prepare.prepare([str(tmp_path / "cjk.jsonl")], tok.path, tmp_path / "cjk", val_fraction=0, progress=False)
    is_byte = np.array([tok._sp.is_byte(i) for i in range(tok.vocab_size)])
    loader = pipeline.make_loader(_config(b, tmp_path / "cjk", weights="0.75,0.25"), "train", seq_len=SEQ,
                                  global_batch_size=BATCH)
    byte_targets = total = 0
    for batch in _take(loader, 300):
        targets = batch["targets"][batch["loss_weights"] > 0]
        byte_targets += is_byte[targets].sum()
        total += len(targets)
    assert byte_targets / total == pytest.approx(0.25, abs=0.03)


def test_config_errors(datasets, tmp_path):
    tok, a, b = datasets
    with pytest.raises(ConfigError, match=r"has 1000 tokens but model.vocab_size is 512.*1024"):
        pipeline.make_loader(_config(a, vocab=512), "train", seq_len=SEQ, global_batch_size=BATCH)
    with pytest.raises(ConfigError, match="data.weights has 1 values but data.datasets names 2"):
        pipeline.make_loader(_config(a, b, weights="1"), "train", seq_len=SEQ, global_batch_size=BATCH)
    with pytest.raises(ConfigError, match="must all be positive"):
        pipeline.make_loader(_config(a, b, weights="1,0"), "train", seq_len=SEQ, global_batch_size=BATCH)
    with pytest.raises(ConfigError, match="global_batch_size=5 does not split evenly over 2 processes"):
        pipeline.make_loader(_config(a), "train", seq_len=SEQ, global_batch_size=5, process_count=2)
    with pytest.raises(DataError, match="is not a prepared dataset"):
        pipeline.make_loader(_config(tmp_path), "train", seq_len=SEQ, global_batch_size=BATCH)
    config = _config(a)
    config.data.tokenizer = str(train_small_tokenizer(tmp_path, vocab_size=900).path)
    with pytest.raises(ConfigError, match="is not the tokenizer .* was prepared with"):
        pipeline.make_loader(config, "train", seq_len=SEQ, global_batch_size=BATCH)
    other = tmp_path / "other"
    write_jsonl(tmp_path / "x.jsonl", ["some text"])
    prepare.prepare([str(tmp_path / "x.jsonl")], config.data.tokenizer, other, val_fraction=0, progress=False)
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        pipeline.make_loader(_config(a, other), "train", seq_len=SEQ, global_batch_size=BATCH)
    with pytest.raises(DataError, match="has no val documents"):
        pipeline.make_loader(_config(other), "val", seq_len=SEQ, global_batch_size=BATCH)
