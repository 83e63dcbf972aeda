"""The built-in corpus, end to end as a fresh clone runs it: two processes prepare it at once, then train/resume."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsjax.config import load_config
from dsjax.data import corpus, pipeline, prepare, staging
from dsjax.data.tokenizer import load_tokenizer, padded_vocab_size
from tests.test_data_common import read_split

ROOT = Path(__file__).resolve().parent.parent
PREPARE = (
    f"import sys; sys.path.insert(0, {str(ROOT)!r}); from dsjax.config import load_config; "
    "from dsjax.data.corpus import ensure_builtin; print(ensure_builtin(load_config('tiny'))['dir'])"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache that two processes fill at the same time, as the processes of one run would."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "DSJAX_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    dirs = {out.strip() for out, _ in outputs}
    assert len(dirs) == 1
    assert [p.name for p in cache.iterdir()] == [Path(dirs.pop()).name]  # one copy, no partial leftovers
    return cache


@pytest.fixture
def tiny(cache, monkeypatch):
    monkeypatch.setenv("DSJAX_CACHE", str(cache))
    return load_config("tiny")


def test_prepared_once_then_cached(tiny, cache):
    first = corpus.ensure_builtin(tiny)
    stamp = (Path(first["dir"]) / "manifest.json").stat().st_mtime_ns
    start = time.time()
    again = corpus.ensure_builtin(tiny)
    assert again["dir"] == first["dir"] and time.time() - start < 5
    assert (Path(first["dir"]) / "manifest.json").stat().st_mtime_ns == stamp
    assert Path(first["dir"]).parent == cache


def test_top_level_split_reassembles_exactly():
    text = "import os\nimport sys\n\n\ndef f(x):\n    return x\n\n    # indented comment\n\nclass A:\n    pass\n"
    pieces = corpus.split_top_level(text, min_chars=1)
    assert "".join(pieces) == text
    assert pieces == ["import os\nimport sys\n\n\n", "def f(x):\n    return x\n\n    # indented comment\n\n",
                      "class A:\n    pass\n"]
    assert corpus.split_top_level(text, min_chars=10_000) == [text]
    for f in corpus.stdlib_files()[:50]:
        source = f.read_text(encoding="utf-8")
        assert "".join(corpus.split_top_level(source)) == source


def test_contents_are_the_stdlib_sources(tiny):
    paths = corpus.ensure_builtin(tiny)
    manifest = paths["manifest"]
    tok = load_tokenizer(paths["tokenizer"])
    assert tok.vocab_size == manifest["tokenizer"]["vocab_size"] == tiny.data.builtin_vocab_size == 4000
    assert padded_vocab_size(tok.vocab_size) == tiny.model.vocab_size == 4096
    files = corpus.stdlib_files()
    assert files and all("site-packages" not in f.parts and not f.name.startswith("test_") for f in files)
    pieces = [b for f in files for b in corpus.split_top_level(f.read_text(encoding="utf-8")) if b.strip()]
    blocks = set(pieces)
    splits = manifest["splits"]
    # Every non-empty top-level block is a document, unless it repeats another exactly (dedup); empty files are
    # skipped (and counted) before splitting.
    assert splits["train"]["documents"] + splits["val"]["documents"] + manifest["duplicates_removed"] == len(pieces)
    assert 0 < splits["val"]["documents"] < splits["train"]["documents"] / 10
    d = Path(paths["dir"])
    for split in ("train", "val"):
        for record in read_split(d, split):
            assert record[0] == tok.bos_id and record[-1] == tok.eos_id
            text = tok.decode(record)
            assert text in blocks  # exactly a top-level block of a source file, whitespace and all
            assert prepare.held_out(prepare.text_hash(text), tiny.data.builtin_val_fraction) == (split == "val")


def test_tiny_loader_runs_and_resumes_exactly(tiny):
    make = lambda: pipeline.make_loader(tiny, "train", seq_len=tiny.train.seq_len,  # noqa: E731
                                        global_batch_size=tiny.train.global_batch_size)
    loader = make()
    first = [next(loader) for _ in range(4)]
    state = json.loads(json.dumps(loader.get_state()))
    rest = [next(loader) for _ in range(4)]
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(4)]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    batch = first[0]
    assert batch["tokens"].shape == (tiny.train.global_batch_size, tiny.train.seq_len) and batch["loss_weights"].all()
    tok = load_tokenizer(loader.tokenizer_path)
    text = tok.decode(batch["tokens"][0][batch["segment_ids"][0] == batch["segment_ids"][0][-1]])
    assert any(text in f.read_text(encoding="utf-8") for f in corpus.stdlib_files())
    val = pipeline.make_loader(tiny, "val", seq_len=tiny.train.seq_len, global_batch_size=16)
    batches = list(val)
    assert len(batches) == val.num_batches
    assert sum(b["loss_weights"].sum() for b in batches) == val.stats["targets"] > 0 and val.stats["bytes"] > 0


def test_publish_race_and_overwrite(tmp_path):
    final = tmp_path / "data"
    with staging.staging_dir(final) as a, staging.staging_dir(final) as b:
        (a / "who").write_text("a")
        (b / "who").write_text("b")
        assert staging.publish(a, final, overwrite=False)
        assert not staging.publish(b, final, overwrite=False)  # the loser keeps the winner's copy
        assert (final / "who").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    with staging.staging_dir(final) as c:
        (c / "who").write_text("c")
        assert staging.publish(c, final, overwrite=True)
    assert (final / "who").read_text() == "c" and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
