"""prepare --format=preference (TRL pairs, bad rows, --max_len) and the DPO row-pair batches (pairs kept together)."""

import json

import grain
import numpy as np
import pytest

from dsjax.config import default_config
from dsjax.data import chat, conversations, pipeline, prepare, records
from dsjax.data.packing import PackedPairsIterDataset, pair_rows
from dsjax.errors import ConfigError, DataError
from tests.test_data_common import train_small_tokenizer

SEQ, BATCH = 64, 4
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("pref_tok"))


def _pair_rows_of(records_, seq_len, packing=True, bos=1, chunk=2):
    source = grain.MapDataset.source(records_).batch(chunk, batch_fn=list).to_iter_dataset()
    return PackedPairsIterDataset(source, seq_len=seq_len, pad_id=0, bos_id=bos, packing=packing)


def _record(chosen, rejected):
    return np.concatenate([np.asarray(chosen, np.int32), np.asarray(rejected, np.int32)], axis=1)


def test_rows_parse_as_trl_does():
    assert conversations.preference_row({"prompt": "Q", "chosen": "good", "rejected": "bad"}) == (
        [U("Q")], [A("good")], [A("bad")])
    assert conversations.preference_row({"chosen": [U("Q"), A("x"), U("Q2"), A("good")],
                                         "rejected": [U("Q"), A("x"), U("Q2"), A("bad")]}) == (
        [U("Q"), A("x"), U("Q2")], [A("good")], [A("bad")])
    bad = [
        ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"chosen": [U("Q"), A("a")], "rejected": [U("other"), A("b")]}, "no_shared_prompt"),
        ({"chosen": [A("a")], "rejected": [A("b")]}, "no_shared_prompt"),
        ({"chosen": "a", "rejected": "b"}, "no_shared_prompt"),
        ({"prompt": "Q", "chosen": " ", "rejected": "b"}, "empty_content"),
        ({"prompt": "Q", "chosen": [U("a")], "rejected": "b"}, "no_assistant"),
        ({"prompt": "Q", "chosen": "a"}, "missing_field"),
    ]
    for record, reason in bad:
        with pytest.raises(conversations.BadRow) as e:
            conversations.preference_row(record)
        assert e.value.reason == reason, record


def test_hand_packed_row_pairs():
    B = 1
    pairs = [
        _record([[B, 5, 6, 2], [0, 0, 1, 1]], [[B, 5, 7, 8, 2], [0, 0, 1, 1, 1]]),  # 3 and 4 pairs
        _record([[B, 9, 2], [0, 1, 1]], [[B, 9, 3, 2], [0, 1, 1, 1]]),  # 2 and 3: rejected no longer fits in 6
        _record([[B, 4, 2], [0, 1, 1]], [[B, 4, 2], [0, 0, 1]]),
    ]
    rows = list(_pair_rows_of(pairs, seq_len=6))
    assert len(rows) == 2 == pair_rows([(4, 5), (3, 4), (3, 3)], 6)
    first, second = rows
    assert first["tokens"].tolist() == [[B, 5, 6, 0, 0, 0], [B, 5, 7, 8, 0, 0]]
    assert first["loss_weights"].tolist() == [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]]
    assert first["segment_ids"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert second["tokens"].tolist() == [[B, 9, B, 4, 0, 0], [B, 9, 3, B, 4, 0]]
    assert second["targets"].tolist() == [[9, 2, 4, 2, 0, 0], [9, 3, 2, 4, 2, 0]]
    assert second["loss_weights"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]]
    assert second["segment_ids"].tolist() == [[1, 1, 2, 2, 0, 0], [1, 1, 1, 2, 2, 0]]
    assert second["positions"].tolist() == [[0, 1, 0, 1, 0, 0], [0, 1, 2, 0, 1, 0]]
    assert len(list(_pair_rows_of(pairs, seq_len=6, packing=False))) == 3 == pair_rows([(4, 5), (3, 4), (3, 3)], 6,
                                                                                         packing=False)


@pytest.fixture(scope="module")
def pref_dataset(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    rows = []
    for a in range(30):
        for b in range(3):
            right, wrong = str(a + b), str(a + b + 1 + (a % 3))
            rows.append({"prompt": [U(f"What is {a} + {b}?")], "chosen": [A(right)], "rejected": [A(wrong)]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = root / "prepared"
    prepare.prepare([str(root / "pairs.jsonl")], tok.path, out, format="preference", val_fraction=0.2,
                    progress=False, workers=1)
    return out, rows


def _stored_pairs(dataset_dir, split, bos):
    from dsjax.data.packing import split_pair
    manifest = prepare.read_manifest(dataset_dir)
    reader = records.DocumentReader([[dataset_dir / s for s in manifest["splits"][split]["shards"]]],
                                    np.dtype(manifest["token_dtype"]), weighted=True)
    out = [split_pair(r, bos) for r in reader.read([(0, i) for i in range(reader.num_records(0))])]
    reader.close()
    return out


def test_prepare_pairs_counts_bad_rows(tok, tmp_path, capsys):
    lines = [
        json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}),  # 1 kept
        json.dumps({"prompt": "Q", "chosen": "same", "rejected": "same"}),  # 2 identical
        json.dumps({"chosen": [U("a"), A("b")], "rejected": [U("c"), A("d")]}),  # 3 no_shared_prompt
        json.dumps({"prompt": "Q", "chosen": "", "rejected": "r"}),  # 4 empty_content
        json.dumps({"prompt": "x " * 60, "chosen": "y", "rejected": "z"}),  # 5 truncated_away
        json.dumps({"chosen": [U("Hi"), A("Hello!")], "rejected": [U("Hi"), A("Go away.")]}),  # 6 kept
        "{bad json",  # 7
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    m = prepare.prepare([str(path)], tok.path, tmp_path / "o", format="preference", val_fraction=0, max_len=40,
                        progress=False, workers=1)
    assert {k: v for k, v in m["skipped"].items() if v} == {"identical": 1, "no_shared_prompt": 1,
                                                            "empty_content": 1, "truncated_away": 1,
                                                            "invalid_json": 1}
    assert sorted(e.split(": ")[0] for e in m["skipped_examples"]) == sorted(f"{path}:{n}" for n in (2, 3, 4, 5, 7))
    assert "skipped 5 rows" in capsys.readouterr().err and m["data_format"] == "preference"
    expected = []
    for prompt, chosen, rejected in ([[U("What is 1 + 1?")], [A("2")], [A("3")]],
                                     [[U("Hi")], [A("Hello!")], [A("Go away.")]]):
        c = chat.tokenize(tok, prompt + chosen, train_from=len(prompt))
        r = chat.tokenize(tok, prompt + rejected, train_from=len(prompt))
        expected.append((c, r))
    stored = _stored_pairs(tmp_path / "o", "train", tok.bos_id)
    as_lists = lambda c, r: (c[0].tolist(), c[1].tolist(), r[0].tolist(), r[1].tolist())  # noqa: E731
    assert sorted(as_lists(c, r) for c, r in stored) == sorted(
        as_lists(np.stack(c), np.stack(r)) for c, r in expected)
    train = m["splits"]["train"]
    assert train["pairs"] == 2 and train["chosen_tokens"] == sum(int(c[1].sum()) for c, _ in expected)
    assert train["targets"] == train["chosen_tokens"] + train["rejected_tokens"]
    assert np.load(tmp_path / "o" / train["pair_lengths"]).tolist() == [[c.shape[1], r.shape[1]] for c, r in stored]
    # chosen == rejected only: refused, one sentence.
    (tmp_path / "bad.jsonl").write_text(lines[1] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^--input=.* holds no usable preference pair \(1 skipped: 1 identical, "):
        prepare.prepare([str(tmp_path / "bad.jsonl")], tok.path, tmp_path / "b", format="preference",
                        progress=False)


def _config(d):
    config = default_config()
    config.data.datasets = str(d)
    config.model.vocab_size = 1024
    return config


def test_batches_keep_each_pair_in_a_row_pair(pref_dataset, tok):
    out, _ = pref_dataset
    stored = {tuple(c[0].tolist()): r for c, r in _stored_pairs(out, "train", tok.bos_id)}
    loader = pipeline.make_loader(_config(out), "train", seq_len=SEQ, global_batch_size=BATCH, seed=0)
    assert loader.data_format == "preference"
    pairs_seen = 0
    for batch in [next(loader) for _ in range(5)]:
        assert batch["tokens"].shape == (BATCH, SEQ)
        view = {k: v.reshape(-1, 2, SEQ) for k, v in batch.items()}
        for p in range(BATCH // 2):
            assert set(view["segment_ids"][p, 0].tolist()) == set(view["segment_ids"][p, 1].tolist())
            for s in set(view["segment_ids"][p, 0].tolist()) - {0}:
                halves = []
                for side in range(2):
                    mask = view["segment_ids"][p, side] == s
                    halves.append((np.append(view["tokens"][p, side][mask], view["targets"][p, side][mask][-1]),
                                   view["loss_weights"][p, side][mask]))
                (c_tokens, c_w), (r_tokens, r_w) = halves
                rejected = stored[tuple(c_tokens.tolist())]  # segment s of the chosen row is a stored chosen ...
                assert r_tokens.tolist() == rejected[0].tolist()  # ... and segment s of the rejected row its pair
                assert r_w.tolist() == rejected[1, 1:].tolist() and c_w.sum() > 0
                pairs_seen += 1
    assert pairs_seen > 5 * BATCH // 2  # packed: several pairs per row pair
    val = pipeline.make_loader(_config(out), "val", seq_len=SEQ, global_batch_size=BATCH, packing=False)
    batches = list(val)
    m = prepare.read_manifest(out)["splits"]["val"]
    assert len(batches) == val.num_batches == -(-m["pairs"] // (BATCH // 2))
    assert sum(b["loss_weights"].sum() for b in batches) == m["targets"]
    with pytest.raises(ConfigError, match="even number of rows per process"):
        pipeline.make_loader(_config(out), "train", seq_len=SEQ, global_batch_size=6, process_count=2)


def test_pair_loader_resumes_exactly(pref_dataset):
    out, _ = pref_dataset
    make = lambda: pipeline.make_loader(_config(out), "train", seq_len=SEQ, global_batch_size=BATCH,  # noqa: E731
                                        seed=5)
    full = [b for _, b in zip(range(8), make())]
    for stop in (1, 4):
        first = make()
        for _ in range(stop):
            next(first)
        resumed = make()
        resumed.set_state(json.loads(json.dumps(first.get_state())))
        rest = [next(resumed) for _ in range(8 - stop)]
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(rest, full[stop:]) for k in a)
