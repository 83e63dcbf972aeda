"""Per-process data shares: each process reads only the records its rows hold, the shares concatenate to the
single-process batch (text, chat and preference data, train and val), and a state saved with N processes resumes
on any other number exactly."""

import json

import numpy as np
import pytest

from dsjax.config import default_config
from dsjax.data import pipeline, prepare, records, synthetic
from tests.test_data_common import stdlib_texts, train_small_tokenizer, write_jsonl

SEQ, BATCH, STEPS = 64, 8, 6


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """{format: config.data.datasets}: a mixture of two text datasets, a chat dataset, a preference dataset."""
    root = tmp_path_factory.mktemp("shares")
    tok = train_small_tokenizer(root)
    write_jsonl(root / "files.jsonl", stdlib_texts(20))
    write_jsonl(root / "paragraphs.jsonl", [p for t in stdlib_texts(30)[20:] for p in t.split("\n\n") if p.strip()])
    for name in ("files", "paragraphs"):
        prepare.prepare([str(root / f"{name}.jsonl")], tok.path, root / name, val_fraction=0.2, progress=False)
    train, val = synthetic.write_jsonl(root / "chat", train_count=120, val_count=30, seed=0)
    prepare.prepare([str(train)], tok.path, root / "chat_prepared", format="chat", val_inputs=[str(val)],
                    progress=False, workers=1)
    pairs = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
              "chosen": [{"role": "assistant", "content": str(a + b)}],
              "rejected": [{"role": "assistant", "content": str(a + b + 1 + a % 3)}]}
             for a in range(40) for b in range(3)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    prepare.prepare([str(root / "pairs.jsonl")], tok.path, root / "pref", format="preference", val_fraction=0.2,
                    progress=False, workers=1)
    return {"text": f"{root / 'files'},{root / 'paragraphs'}", "paragraphs": str(root / "paragraphs"), "chat": str(root / "chat_prepared"),
            "preference": str(root / "pref")}


def _config(datasets):
    config = default_config()
    config.data.datasets = datasets
    config.model.vocab_size = 1024
    return config


class _Reads:
    """Records every (dataset, record) key read from the shards."""

    def __init__(self, monkeypatch):
        self.keys = []
        original = records.DocumentReader.read

        def read(reader, keys):
            self.keys += list(keys)
            return original(reader, keys)

        monkeypatch.setattr(records.DocumentReader, "read", read)


def _batches(config, split, count, process_index=0, process_count=1, state=None):
    loader = pipeline.make_loader(config, split, seq_len=SEQ, global_batch_size=BATCH, process_index=process_index,
                                  process_count=process_count)
    if state is not None:
        loader.set_state(json.loads(json.dumps(state)))
    out = [next(loader) for _ in range(count)] if count else list(loader)
    return out, loader.get_state()


def _concat(shares):
    """Per-process batches [process][step] -> global batches [step], the shares in process order."""
    return [{k: np.concatenate([share[step][k] for share in shares]) for k in pipeline.packing.FIELDS}
            for step in range(len(shares[0]))]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in pipeline.packing.FIELDS)


@pytest.mark.parametrize("fmt", ["text", "chat", "preference"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_shares_concatenate_to_the_single_process_batch(datasets, fmt, split):
    config = _config(datasets[fmt])
    count = STEPS if split == "train" else 0  # val: the whole padded pass
    single, _ = _batches(config, split, count)
    assert np.any(single[-1]["segment_ids"] > 0)
    for n in (2, 4):
        shares = [_batches(config, split, count, p, n)[0] for p in range(n)]
        assert all(len(share) == len(single) for share in shares)
        assert all(b["tokens"].shape == (BATCH // n, SEQ) for share in shares for b in share)
        assert _same(_concat(shares), single), f"{n} processes, {fmt} {split}"


def _records_of_rows(config, rows, process_count):
    """Oracle by arithmetic on the prepared lengths: {process: the records with a pair in its first `rows` global
    rows}; text pairs fill rows of SEQ in stream order, and global row r belongs to process (r % BATCH) // share."""
    sources = pipeline.resolve_sources(config)
    stats = [s.manifest["splits"]["train"] for s in sources]
    proportions = pipeline.mixture.document_proportions(None, stats)
    stream = pipeline._document_stream([m["documents"] for m in stats], proportions, split="train", seed=0,
                                       num_epochs=None)
    lengths = [np.load(s.dir / m["lengths"]) for s, m in zip(sources, stats)]
    out, start, i = {p: set() for p in range(process_count)}, 0, 0
    while start < rows * SEQ:
        key = stream[i]
        pairs = max(int(lengths[key[0]][key[1]]) - 1, 0)
        for row in range(start // SEQ, (start + pairs - 1) // SEQ + 1) if pairs else ():
            if row < rows:
                out[(row % BATCH) // (BATCH // process_count)].add(key)
        start, i = start + pairs, i + 1
    return out


@pytest.mark.parametrize("data", ["text", "paragraphs"])
def test_each_process_reads_only_the_records_of_its_rows(datasets, monkeypatch, data):
    config = _config(datasets[data])
    expected = _records_of_rows(config, STEPS * BATCH, 4)
    reads = _Reads(monkeypatch)
    for p in range(4):
        reads.keys = []
        _batches(config, "train", STEPS, p, 4)
        assert sorted(reads.keys) == sorted(expected[p])  # exactly its own records, each read once
    if data == "paragraphs":  # short records: only those cut by a boundary between shares are read twice
        everything = set().union(*expected.values())  # (whole files are cut over all four)
        assert sum(len(mine) for mine in expected.values()) < 2 * len(everything)


@pytest.mark.parametrize("fmt", ["text", "preference"])
def test_a_state_saved_by_two_processes_resumes_on_one_and_on_four(datasets, fmt):
    config = _config(datasets[fmt])
    whole, _ = _batches(config, "train", STEPS)
    states = [_batches(config, "train", 2, p, 2)[1] for p in range(2)]
    assert states[0] == states[1]  # the same on every process, so process 0's copy in the checkpoint is enough
    resumed_one, _ = _batches(config, "train", STEPS - 2, state=states[0])
    assert _same(resumed_one, whole[2:])
    resumed_four = [_batches(config, "train", STEPS - 2, p, 4, state=states[0])[0] for p in range(4)]
    assert _same(_concat(resumed_four), whole[2:])
