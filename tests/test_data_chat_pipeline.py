"""prepare --format=chat (records, counts, bad rows, --max_len, parquet, --val_input) and the chat loader (weights,
whole conversations per segment, packing on and off, val passes, exact resume)."""

import json

import grain
import numpy as np
import pytest

from dsjax.config import default_config
from dsjax.data import chat, pipeline, prepare, records, synthetic
from dsjax.data.packing import PackedConversationsIterDataset, conversation_rows
from dsjax.errors import ConfigError, DataError
from tests.test_data_common import train_small_tokenizer, write_jsonl

PAD = 0
SEQ, BATCH = 96, 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture(scope="module")
def dataset(tok, tmp_path_factory):
    """Synthetic single-turn conversations plus a few multi-turn ones, prepared with an explicit val file."""
    root = tmp_path_factory.mktemp("chat_data")
    train, val = synthetic.write_jsonl(root, train_count=300, val_count=40, seed=0)
    multi = [{"messages": [{"role": "user", "content": f"Count to {n}."},
                           {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))},
                           {"role": "user", "content": "Again, backwards."},
                           {"role": "assistant", "content": " ".join(str(i) for i in range(n, 0, -1))}]}
             for n in range(1, 21)]
    (root / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multi), encoding="utf-8")
    out = root / "prepared"
    prepare.prepare([str(train), str(root / "multi.jsonl")], tok.path, out, format="chat", val_inputs=[str(val)],
                    progress=False, workers=1)
    return out


def _stored(dataset_dir, split):
    manifest = prepare.read_manifest(dataset_dir)
    reader = records.DocumentReader([[dataset_dir / s for s in manifest["splits"][split]["shards"]]],
                                    np.dtype(manifest["token_dtype"]), weighted=True)
    convs = reader.read([(0, i) for i in range(reader.num_records(0))])
    reader.close()
    return convs


def _config(*dirs):
    config = default_config()
    config.data.datasets = ",".join(str(d) for d in dirs)
    config.model.vocab_size = 1024
    return config


def _conv(tokens, weights):
    return np.asarray([tokens, weights], np.int32)


def _rows(convs, seq_len, packing=True, chunk=2):
    source = grain.MapDataset.source(convs).batch(chunk, batch_fn=list).to_iter_dataset()
    return PackedConversationsIterDataset(source, seq_len=seq_len, pad_id=PAD, packing=packing)


HAND = [
    _conv([1, 10, 11, 12, 2], [0, 0, 1, 1, 1]),  # 4 pairs
    _conv([1, 20, 21, 2], [0, 0, 1, 1]),  # 3 pairs: does not fit after the first in a row of 6
    _conv([1, 30, 2], [0, 1, 1]),  # 2 pairs
    _conv([1, 40, 41, 42, 43, 44, 45, 2], [0, 0, 0, 1, 1, 1, 1, 1]),  # 7 pairs: keeps its first 6
]


def test_hand_packed_conversations():
    rows = list(_rows(HAND, seq_len=6))
    P = PAD
    expected = [  # tokens, targets, loss_weights, segment_ids, positions
        ([1, 10, 11, 12, P, P], [10, 11, 12, 2, P, P], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0, 1, 2, 3, 0, 0]),
        ([1, 20, 21, 1, 30, P], [20, 21, 2, 30, 2, P], [0, 1, 1, 1, 1, 0], [1, 1, 1, 2, 2, 0], [0, 1, 2, 0, 1, 0]),
        ([1, 40, 41, 42, 43, 44], [40, 41, 42, 43, 44, 45], [0, 0, 1, 1, 1, 1], [1] * 6, [0, 1, 2, 3, 4, 5]),
    ]
    assert len(rows) == len(expected) == conversation_rows([c.shape[1] for c in HAND], 6)
    for row, (tokens, targets, weights, segments, positions) in zip(rows, expected):
        assert row["tokens"].tolist() == tokens and row["targets"].tolist() == targets
        assert row["loss_weights"].tolist() == weights and row["loss_weights"].dtype == np.float32
        assert row["segment_ids"].tolist() == segments and row["positions"].tolist() == positions
    # One conversation per row: the same segments, each alone and padded.
    single = list(_rows(HAND, seq_len=6, packing=False))
    assert len(single) == 4 == conversation_rows([c.shape[1] for c in HAND], 6, packing=False)
    assert single[1]["tokens"].tolist() == [1, 20, 21, P, P, P] and single[2]["loss_weights"].tolist() == [1, 1, 0,
                                                                                                            0, 0, 0]
    assert all(set(r["segment_ids"].tolist()) <= {0, 1} for r in single)


@pytest.mark.parametrize("packing", [True, False])
def test_packer_resumes_from_every_row_after_json(packing):
    rng = np.random.default_rng(0)
    convs = [_conv(rng.integers(3, 100, n), rng.integers(0, 2, n)) for n in rng.integers(2, 15, 40)]
    full = list(_rows(convs, 16, packing, chunk=3))
    for stop in range(len(full)):
        it = iter(_rows(convs, 16, packing, chunk=3))
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = _rows(convs, 16, packing, chunk=3).__iter__()
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(full) - stop
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(rest, full[stop:]) for k in a)


def test_prepare_counts_and_locates_bad_rows(tok, tmp_path, capsys):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    lines = [
        json.dumps({"messages": good}),  # 1 kept
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}),  # 2
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 3 no_assistant
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),  # 4
        "not json",  # 5 invalid_json
        json.dumps({"text": "plain text"}),  # 6 missing_field
        "",  # 7 blank: not a row
        json.dumps({"prompt": "What is 2 + 2?", "completion": "4"}),  # 8 kept
        json.dumps({"messages": good}),  # 9 duplicate of line 1
        json.dumps({"messages": [{"role": "user", "content": "x " * 40}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}),  # 11 invalid_message
        json.dumps({"messages": [{"role": "user", "content": "Tell a long story."},
                                 {"role": "assistant", "content": "Once upon a time " * 10}]}),  # 12 truncated, kept
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    max_len = 30
    m = prepare.prepare([str(path)], tok.path, tmp_path / "out", format="chat", val_fraction=0, max_len=max_len,
                        progress=False, workers=1)
    assert m["skipped"] == {"invalid_utf8": 0, "invalid_json": 1, "missing_field": 1, "invalid_message": 1,
                            "unknown_role": 1, "empty_content": 1, "no_assistant": 1, "truncated_away": 1}
    # (truncated_away is found after tokenizing, a batch later than the others)
    assert sorted(e.split(": ")[0] for e in m["skipped_examples"]) == sorted(f"{path}:{n}" for n in (2, 3, 4, 5, 6,
                                                                                                     10, 11))
    assert m["duplicates_removed"] == 1 and m["data_format"] == "chat" and m["max_len"] == max_len
    err = capsys.readouterr().err
    assert "skipped 7 rows" in err and f"{path}:2: message 1 has role 'robot'" in err
    # The records are the tokenization of the kept rows, cut to --max_len, with their weights.
    kept = [
        chat.tokenize(tok, good),
        chat.tokenize(tok, [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
                      train_from=1),
        chat.tokenize(tok, json.loads(lines[11])["messages"]),
    ]
    assert len(kept[2][0]) > max_len and len(kept[0][0]) <= max_len and len(kept[1][0]) <= max_len
    kept = [(ids[:max_len], w[:max_len]) for ids, w in kept]
    stored = _stored(tmp_path / "out", "train")
    assert sorted(c[0].tolist() + c[1].tolist() for c in stored) == sorted(i.tolist() + w.tolist() for i, w in kept)
    train = m["splits"]["train"]
    assert train["conversations"] == train["documents"] == 3 and m["truncated"] == train["truncated"] == 1
    assert train["tokens"] == sum(len(i) for i, _ in kept)
    assert train["assistant_tokens"] == train["targets"] == sum(int(w.sum()) for _, w in kept)
    assert train["bytes"] == len(" Hello there.".encode()) + len(" 4".encode()) + len(
        tok.decode(kept[2][0][kept[2][1] == 1]).encode())
    assert np.load(tmp_path / "out" / train["lengths"]).tolist() == [c.shape[1] for c in stored]


def test_all_bad_input_is_refused_in_one_sentence(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n" +
                    json.dumps({"prompt": "p"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        prepare.prepare([str(path)], tok.path, tmp_path / "out", format="chat", progress=False, workers=1)
    message = str(e.value)
    assert message.startswith(f"--input={path} holds no usable conversation (2 skipped: 1 missing_field, "
                              f"1 no_assistant, the first at {path}:1: no assistant turn).")
    assert message.count(". ") == 0 and not (tmp_path / "out").exists()
    with pytest.raises(DataError, match=r"^--max_len=5 needs --format=chat"):
        prepare.prepare([str(path)], tok.path, tmp_path / "out", max_len=5, progress=False)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match=r"a\.txt is not a \.jsonl or \.parquet file"):
        prepare.prepare([str(tmp_path / "a.txt")], tok.path, tmp_path / "out", format="chat", progress=False)


def test_parquet_rows_and_cli(tok, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    messages = [[{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}] for i in range(3)]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "conv.parquet")
    pq.write_table(pa.table({"prompt": ["P1", "P2"], "completion": ["C1", " "]}), tmp_path / "pc.parquet")
    prepare.main(["--input", str(tmp_path / "conv.parquet"), str(tmp_path / "pc.parquet"), f"--tokenizer={tok.path}",
                  f"--output={tmp_path / 'o'}", "--format=chat", "--val_fraction=0", "--workers=1"])
    err = capsys.readouterr().err
    assert "prepared 4 train conversations" in err and f"{tmp_path / 'pc.parquet'}:row 2: message 1" in err
    m = prepare.read_manifest(tmp_path / "o")
    assert m["skipped"]["empty_content"] == 1 and m["splits"]["train"]["conversations"] == 4
    expected = [chat.tokenize(tok, ms) for ms in messages] + [
        chat.tokenize(tok, [{"role": "user", "content": "P1"}, {"role": "assistant", "content": "C1"}], train_from=1)]
    stored = _stored(tmp_path / "o", "train")
    assert sorted(c.tolist() for c in stored) == sorted([i.tolist(), w.tolist()] for i, w in expected)


def test_val_input_is_the_val_split(dataset, tok):
    m = prepare.read_manifest(dataset)
    assert m["splits"]["val"]["conversations"] == 40 and m["splits"]["train"]["conversations"] == 320
    assert m["val_fraction"] == 0 and len(m["val_inputs"]) == 1
    held_out = [chat.tokenize(tok, ms + [{"role": "assistant", "content": a}]) for ms, a in synthetic.held_out(40)]
    assert sorted(c.tolist() for c in _stored(dataset, "val")) == sorted([i.tolist(), w.tolist()] for i, w in held_out)


def test_loader_batches_hold_whole_conversations_with_their_weights(dataset, tok):
    stored = _stored(dataset, "train")
    # Conversations longer than SEQ + 1 tokens (the long multi-turn ones) keep their first SEQ pairs.
    assert any(c.shape[1] > SEQ + 1 for c in stored)
    by_tokens = {tuple(c[0, : SEQ + 1].tolist()): c[1, : SEQ + 1] for c in stored}
    loader = pipeline.make_loader(_config(dataset), "train", seq_len=SEQ, global_batch_size=BATCH, seed=1)
    assert loader.data_format == "chat"
    seen = 0
    for batch in [next(loader) for _ in range(8)]:
        assert set(batch) == set(pipeline.packing.FIELDS) and batch["tokens"].shape == (BATCH, SEQ)
        for row in range(BATCH):
            seg = batch["segment_ids"][row]
            assert np.all(batch["loss_weights"][row][seg == 0] == 0)
            for s in set(seg.tolist()) - {0}:
                mask = seg == s
                tokens = np.append(batch["tokens"][row][mask], batch["targets"][row][mask][-1])
                # A segment is one whole stored conversation: its targets' weights are the stored weights.
                assert tuple(tokens.tolist()) in by_tokens
                assert batch["loss_weights"][row][mask].tolist() == by_tokens[tuple(tokens.tolist())][1:].tolist()
                assert batch["positions"][row][mask].tolist() == list(range(mask.sum()))
                assert tokens[0] == tok.bos_id and (tokens[-1] == tok.eos_id or len(tokens) == SEQ + 1)
                seen += 1
        # Several conversations share a row by default.
        assert batch["segment_ids"].max() > 1
    assert seen > 8 * BATCH
    single = pipeline.make_loader(_config(dataset), "train", seq_len=SEQ, global_batch_size=BATCH, seed=1,
                                  packing=False)
    batch = next(single)
    assert batch["segment_ids"].max() == 1 and np.all(batch["positions"][:, 0] == 0)


def test_val_pass_counts_its_batches_and_covers_every_conversation(dataset):
    for packing in (True, False):
        loader = pipeline.make_loader(_config(dataset), "val", seq_len=SEQ, global_batch_size=BATCH,
                                      packing=packing)
        batches = list(loader)
        assert len(batches) == loader.num_batches
        weights = sum(b["loss_weights"].sum() for b in batches)
        assert weights == prepare.read_manifest(dataset)["splits"]["val"]["assistant_tokens"] == loader.stats[
            "targets"]
        assert np.any(batches[-1]["segment_ids"] > 0)  # no empty batch is padded on with one process


def test_loader_resumes_exactly(dataset):
    make = lambda: pipeline.make_loader(_config(dataset), "train", seq_len=SEQ, global_batch_size=2 * BATCH,  # noqa
                                        process_index=1, process_count=2, seed=3)
    total = 10
    uninterrupted = [b for _, b in zip(range(total), make())]
    for stop in (0, 3, 7):
        first = make()
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.get_state()))
        resumed = make()
        resumed.set_state(state)
        rest = [next(resumed) for _ in range(total - stop)]
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(rest, uninterrupted[stop:]) for k in a)


def test_loader_refusals(dataset, tmp_path, tok):
    write_jsonl(tmp_path / "t.jsonl", ["some text", "more text here"])
    text = tmp_path / "text"
    prepare.prepare([str(tmp_path / "t.jsonl")], tok.path, text, val_fraction=0, progress=False)
    with pytest.raises(DataError, match=r"^data.datasets mixes chat and text datasets; a mixture needs one format\.$"):
        pipeline.make_loader(_config(dataset, text), "train", seq_len=SEQ, global_batch_size=BATCH)
    with pytest.raises(ConfigError, match=r"^packing=False .* needs chat or preference datasets; .* is text\.$"):
        pipeline.make_loader(_config(text), "train", seq_len=SEQ, global_batch_size=BATCH, packing=False)
