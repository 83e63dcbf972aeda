"""prepare: records equal bos + encode(text) + eos, counts and skips are exact, the output appears only when whole."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsjax.data import encoding, prepare, records
from dsjax.errors import DataError
from tests.test_data_common import read_split, stdlib_texts, train_small_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


def _records_by_text(tok, texts):
    return {tuple([tok.bos_id] + tok.encode(t) + [tok.eos_id]): t for t in texts}


def test_jsonl_bad_input_is_counted_and_located(tok, tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    lines = [
        b'{"text": "hello world"}',  # 1 kept
        b"this is not json",  # 2 invalid_json
        b'{"body": "no text field"}',  # 3 missing_field
        b'{"text": "  \\n\\t "}',  # 4 empty
        b'{"text": "caf\xe9"}',  # 5 invalid_utf8
        b'{"text": "hello world   "}',  # 6 duplicate of line 1 once normalized
        b"",  # 7 blank: not a document
        b'{"text": 5}',  # 8 missing_field (not a string)
        b'{"text": "lone \\ud800 surrogate"}',  # 9 invalid_utf8
        b'{"text": "second document 12345\\n"}',  # 10 kept
        b"[1, 2]",  # 11 missing_field
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    manifest = prepare.prepare([str(path)], tok.path, tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["skipped"] == {"invalid_utf8": 2, "invalid_json": 1, "missing_field": 3, "empty": 1}
    assert manifest["duplicates_removed"] == 1
    assert [e.split(": ")[0] for e in manifest["skipped_examples"]] == [
        f"{path}:{n}" for n in (2, 3, 4, 5, 8, 9, 11)
    ]
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err and "skipped 7 documents" in err
    kept = ["hello world", "second document 12345\n"]
    train = manifest["splits"]["train"]
    assert train["documents"] == 2
    assert train["bytes"] == sum(len(t.encode()) for t in kept)
    stored = read_split(tmp_path / "out", "train")
    assert {tuple(r) for r in stored} == set(_records_by_text(tok, kept))
    assert train["tokens"] == sum(len(r) for r in stored) and train["targets"] == train["tokens"] - 2
    assert np.load(tmp_path / "out" / train["lengths"]).tolist() == [len(r) for r in stored]
    assert manifest["splits"]["val"]["documents"] == 0 and manifest["splits"]["val"]["shards"] == []
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tok.path.read_bytes()


def test_txt_dirs_globs_and_a_stable_split(tok, tmp_path):
    texts = stdlib_texts(30)
    for i, text in enumerate(texts):
        sub = tmp_path / "in" / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "in" / "notes.md").write_text("ignored: not an input type")
    a = prepare.prepare([str(tmp_path / "in" / "d0"), str(tmp_path / "in" / "d[12]" / "*.txt")], tok.path,
                        tmp_path / "a", val_fraction=0.3, progress=False)
    b = prepare.prepare([str(tmp_path / "in")], tok.path, tmp_path / "b", val_fraction=0.3, progress=False,
                        workers=1)
    for m in (a, b):
        assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(set(texts))
        assert m["splits"]["val"]["documents"] > 0
    # The split follows the text, not the input order: both runs hold out the same documents.
    for split in ("train", "val"):
        in_a, in_b = read_split(tmp_path / "a", split), read_split(tmp_path / "b", split)
        assert {tuple(r) for r in in_a} == {tuple(r) for r in in_b}
    by_text = _records_by_text(tok, texts)
    val_texts = [by_text[tuple(r)] for r in read_split(tmp_path / "a", "val")]
    assert all(prepare.held_out(prepare.text_hash(t), 0.3) for t in val_texts)
    assert a["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in val_texts)


def test_dedup_modes(tok, tmp_path):
    texts = ["same text\n", "same text", "same text  \r\n", "other text", "same  text"]
    write_jsonl(tmp_path / "d.jsonl", texts)
    exact = prepare.prepare([str(tmp_path / "d.jsonl")], tok.path, tmp_path / "e", val_fraction=0, progress=False)
    assert exact["duplicates_removed"] == 2 and exact["splits"]["train"]["documents"] == 3
    none = prepare.prepare([str(tmp_path / "d.jsonl")], tok.path, tmp_path / "n", val_fraction=0, dedup="none",
                           progress=False)
    assert none["duplicates_removed"] == 0 and none["splits"]["train"]["documents"] == 5


def test_small_shards_roll_over(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", stdlib_texts(30))
    m = prepare.prepare([str(tmp_path / "d.jsonl")], tok.path, tmp_path / "o", val_fraction=0, shard_mb=0,
                        dedup="none", progress=False)
    train = m["splits"]["train"]
    assert len(train["shards"]) == train["documents"] == 30  # a zero-size budget: one document per shard
    assert [tuple(r) for r in read_split(tmp_path / "o", "train")] == [
        tuple([tok.bos_id] + tok.encode(t) + [tok.eos_id]) for t in stdlib_texts(30)
    ]


def test_no_usable_document_is_an_error(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": ""}\nnot json\n')
    message = rf"holds no usable document \(2 skipped: 1 invalid_json, 1 empty, the first at {path}:1"
    with pytest.raises(DataError, match=message):
        prepare.prepare([str(path)], tok.path, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [path]  # no output, no leftovers


def test_existing_output_needs_overwrite(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["first version"])
    write_jsonl(tmp_path / "b.jsonl", ["second version", "and more"])
    out = tmp_path / "out"
    prepare.prepare([str(tmp_path / "a.jsonl")], tok.path, out, val_fraction=0, progress=False)
    with pytest.raises(DataError, match="already exists and is not empty; pass --overwrite"):
        prepare.prepare([str(tmp_path / "b.jsonl")], tok.path, out, val_fraction=0, progress=False)
    assert prepare.read_manifest(out)["splits"]["train"]["documents"] == 1
    prepare.prepare([str(tmp_path / "b.jsonl")], tok.path, out, val_fraction=0, overwrite=True, progress=False)
    assert prepare.read_manifest(out)["splits"]["train"]["documents"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]


def test_interrupted_run_leaves_nothing_claiming_completion(tok, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", ["the old, complete dataset"])
    write_jsonl(tmp_path / "b.jsonl", stdlib_texts(20))
    out = tmp_path / "out"
    prepare.prepare([str(tmp_path / "a.jsonl")], tok.path, out, val_fraction=0, progress=False)
    before = (out / "manifest.json").read_text()

    writes = []

    def interrupted_write(self, ids):
        writes.append(1)
        if len(writes) % 5 == 0:
            raise KeyboardInterrupt
        original_write(self, ids)

    original_write = records.ShardWriter.write
    monkeypatch.setattr(records.ShardWriter, "write", interrupted_write)
    monkeypatch.setattr(prepare, "_BATCH_CHARS", 1)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([str(tmp_path / "b.jsonl")], tok.path, out, val_fraction=0, overwrite=True, progress=False)
    writes.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([str(tmp_path / "b.jsonl")], tok.path, tmp_path / "fresh", progress=False)
    assert (out / "manifest.json").read_text() == before  # the old dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]


def test_read_manifest_refuses_what_is_not_complete(tmp_path):
    with pytest.raises(DataError, match="has no manifest.json"):
        prepare.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": prepare.FORMAT, "complete": False}))
    with pytest.raises(DataError, match="not a complete dsjax-prepared/1 manifest"):
        prepare.read_manifest(tmp_path)


def test_parquet_input(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": ["parquet doc one", None, "", "parquet doc two"], "id": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(pa.table({"other": ["x", "y"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"content": pa.array([b"bytes doc", b"\xff bad"], pa.binary())}), tmp_path / "c.parquet")
    m = prepare.prepare([str(tmp_path / "*.parquet")], tok.path, tmp_path / "out", text_field="content",
                        val_fraction=0, progress=False)
    assert m["skipped"] == {"invalid_utf8": 1, "invalid_json": 0, "missing_field": 3, "empty": 1}
    assert m["skipped_examples"][0].startswith(f"{tmp_path / 'a.parquet'}:row 2: ")
    texts = ["parquet doc one", "parquet doc two", "bytes doc"]
    assert {tuple(r) for r in read_split(tmp_path / "out", "train")} == set(_records_by_text(tok, texts))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet is not a readable parquet file"):
        prepare.prepare([str(tmp_path / "broken.parquet")], tok.path, tmp_path / "o2", progress=False)


def test_input_errors(tok, tmp_path):
    (tmp_path / "notes.md").write_text("x")
    cases = [
        ([str(tmp_path / "missing.jsonl")], "does not exist"),
        ([str(tmp_path / "notes.md")], "is not a .txt/.jsonl/.parquet file"),
        ([str(tmp_path / "*.jsonl")], "matches no .txt/.jsonl/.parquet file"),
        ([str(tmp_path)], "is a directory with no .txt/.jsonl/.parquet file"),
    ]
    for inputs, message in cases:
        with pytest.raises(DataError, match=message):
            prepare.prepare(inputs, tok.path, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="--val_fraction must be between 0 and 1"):
        prepare.prepare([str(tmp_path)], tok.path, tmp_path / "out", val_fraction=1.5)


def test_cli(tok, tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", stdlib_texts(10))
    prepare.main([f"--input={tmp_path / 'd.jsonl'}", f"--tokenizer={tok.path.parent}", f"--output={tmp_path / 'o'}",
                  "--val_fraction=0.2", "--dedup=none"])
    assert "prepared" in capsys.readouterr().err
    m = prepare.read_manifest(tmp_path / "o")
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 10
    assert records.token_dtype(tok.vocab_size).str == m["token_dtype"] == "<u2"
    with pytest.raises(SystemExit, match="error: --output=.* already exists"):
        prepare.main([f"--input={tmp_path / 'd.jsonl'}", f"--tokenizer={tok.path}", f"--output={tmp_path / 'o'}"])


def test_worker_processes_give_the_same_records(tok, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", stdlib_texts(30) + ("text with \u2581 meta", "中文 😀"))
    serial = prepare.prepare([str(tmp_path / "d.jsonl")], tok.path, tmp_path / "serial", workers=1, progress=False)
    monkeypatch.setattr(encoding, "PARALLEL_CHARS", 1)  # use the worker pool even for this small input
    pooled = prepare.prepare([str(tmp_path / "d.jsonl")], tok.path, tmp_path / "pooled", workers=2, progress=False)
    assert {k: v for k, v in pooled.items() if k != "dir"} == {k: v for k, v in serial.items() if k != "dir"}
    for split in ("train", "val"):
        a, b = read_split(tmp_path / "serial", split), read_split(tmp_path / "pooled", split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_worker_failure_is_one_clear_error(tok, tmp_path):
    # A script fed on stdin cannot be re-imported by spawned workers: they die, and the user learns what to do.
    write_jsonl(tmp_path / "d.jsonl", stdlib_texts(5))
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from dsjax.data import encoding, prepare\n"
        "encoding.PARALLEL_CHARS = 1\n"
        f"prepare.prepare([{str(tmp_path / 'd.jsonl')!r}], {str(tok.path)!r}, {str(tmp_path / 'o')!r}, workers=2,"
        " progress=False)\n"
    )
    result = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "DataError: the tokenizer worker processes died; run prepare from its CLI" in result.stderr
    assert not (tmp_path / "o").exists()
