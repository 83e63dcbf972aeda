"""Tokenizers: the paper's recipe (byte fallback, single digits, exact whitespace), exact round trips, HF parity."""

import json

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import models, pre_tokenizers, trainers

from dsjax.data import tokenizer as tk
from dsjax.errors import DataError
from dsjax.errors import ConfigError
from tests.test_data_common import stdlib_texts, train_byte_level_bpe, train_small_tokenizer

TRICKY = [
    "",
    "中文和日本語のテキスト，한국어도。",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 ",
    "\tindented\twith\ttabs\t",
    "trailing spaces   \n   \n\n",
    "   leading spaces",
    "3141592653589793238462643383279502884197169399375105820974944592" * 3,
    "x = 1_000_000 + 0x1F - 12.5e-3",
    "literal \u2581 meta ▁▁ spaces ▁x",
    "windows\r\nline\r\nends\r\n",
    "nul \x00 and bell \x07 and del \x7f",
    f"forged {tk.BOS} and {tk.EOS} and {tk.PAD} specials",
    "ideographic\u3000space, nbsp\u00a0, zero width\u200b, bom\ufeff",
    "combining e\u0301 vs \u00e9, ligature \ufb01, ﹏ full ＡＢＣ",
    "مرحبا بالعالم עברית",
    "def f(x):\n    if x:\n        return [x, {'a': 1}]\n    return None\n",
    "\U0010ffff\U0001f600\u0080\u07ff\u0800\uffff",
]

text_strategy = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    """A byte-level BPE tokenizer.json made with HF `tokenizers` itself, the kind DeepSeek released."""
    return train_byte_level_bpe(tmp_path_factory.mktemp("hf"))


def test_recipe_special_tokens(spm_tok):
    sp = spm_tok._sp
    assert spm_tok.vocab_size == 1000
    assert (spm_tok.pad_id, spm_tok.bos_id, spm_tok.eos_id) == (0, 1, 2)
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == [tk.PAD, tk.BOS, tk.EOS]
    assert sp.id_to_piece(sp.piece_to_id("\n")) == "\n" and sp.is_unknown(sp.piece_to_id("\n")) is False
    # Special-token text in a document is ordinary text, never a document boundary.
    assert spm_tok.bos_id not in spm_tok.encode(tk.BOS) and spm_tok.eos_id not in spm_tok.encode(tk.EOS)


@pytest.mark.parametrize("text", TRICKY)
def test_spm_round_trip_tricky(spm_tok, text):
    ids = spm_tok.encode(text)
    assert spm_tok.decode(ids) == text
    assert 3 not in ids  # unk: byte fallback covers everything
    assert spm_tok.encode_batch([text, text]) == [ids, ids]


def test_digits_are_single_tokens(spm_tok):
    text = "values 31415926535 and 2024-11-22"
    for i in spm_tok.encode(text):
        piece = spm_tok.decode([i])
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, piece


def test_newlines_and_indentation_kept(spm_tok):
    newline = spm_tok.encode("\n")
    assert len(newline) == 1
    ids = spm_tok.encode("a\n\n\nb")
    assert ids.count(newline[0]) == 3
    # Runs of spaces (indentation) are learned pieces, not one token per space.
    assert len(spm_tok.encode("        return")) < 5


@settings(max_examples=300, deadline=None)
@given(text=text_strategy)
def test_spm_round_trip_property(spm_tok, text):
    ids = spm_tok.encode(text)
    assert spm_tok.decode(ids) == text
    assert 3 not in ids


def test_spm_training_is_deterministic(tmp_path, spm_tok):
    again = train_small_tokenizer(tmp_path)
    assert again.fingerprint == spm_tok.fingerprint
    assert (tmp_path / tk.SPM_FILE).read_bytes() == spm_tok.path.read_bytes()


def test_hf_matches_tokenizers(hf_file):
    ours = tk.load_tokenizer(hf_file)
    oracle = tokenizers.Tokenizer.from_file(str(hf_file))
    oracle.encode_special_tokens = True  # we read special-token text in documents as text (no forged boundaries)
    assert ours.kind == "huggingface"
    assert (ours.bos_id, ours.eos_id) == (oracle.token_to_id(tk.BOS), oracle.token_to_id(tk.EOS))
    assert ours.pad_id == ours.eos_id  # DeepSeek's HF config: pad = eos
    assert ours.vocab_size == oracle.get_vocab_size() == 900
    for text in TRICKY[1:] + list(stdlib_texts(25)[20:]):
        assert ours.encode(text) == oracle.encode(text, add_special_tokens=False).ids
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode_batch(TRICKY) == [ours.encode(t) for t in TRICKY]
    assert ours.eos_id not in ours.encode(tk.EOS) and ours.bos_id not in ours.encode(tk.BOS)


@settings(max_examples=150, deadline=None)
@given(text=text_strategy)
def test_hf_round_trip_property(hf_file, text):
    ours = tk.load_tokenizer(hf_file)
    assert ours.decode(ours.encode(text)) == text


def test_hf_tokenizer_config(hf_file, tmp_path):
    copy = tmp_path / tk.HF_FILE
    copy.write_bytes(hf_file.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": tk.EOS}, "eos_token": tk.BOS}))
    swapped = tk.load_tokenizer(tmp_path)
    assert (swapped.bos_id, swapped.eos_id) == (1, 0)
    assert swapped.fingerprint != tk.load_tokenizer(hf_file).fingerprint
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": tk.EOS}))
    with pytest.raises(DataError, match="no token '<s>'.*bos_token"):
        tk.load_tokenizer(copy)


def test_hf_without_known_specials(tmp_path):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["some text"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="cannot tell the bos/eos tokens"):
        tk.load_tokenizer(tmp_path / "tokenizer.json")


def test_padded_vocab_size():
    assert tk.padded_vocab_size(4000) == 4096
    assert tk.padded_vocab_size(4096) == 4096
    assert tk.padded_vocab_size(129) == 256
    assert tk.padded_vocab_size(100015) == 100096
    assert tk.padded_vocab_size(100015, multiple=4096) == 102400  # the paper's padded size


def test_vocab_larger_than_model_is_refused():
    tk.check_vocab_fits(4000, 4096, "tok.model")
    with pytest.raises(ConfigError, match=r"tok.model has 5000 tokens but model.vocab_size is 4096.*5120"):
        tk.check_vocab_fits(5000, 4096, "tok.model")


def test_fingerprint_tracks_the_file(spm_tok, tmp_path):
    assert tk.load_tokenizer(spm_tok.path).fingerprint == spm_tok.fingerprint
    other = train_small_tokenizer(tmp_path, vocab_size=900)
    assert other.fingerprint != spm_tok.fingerprint


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        tk.load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(DataError, match="neither a sentencepiece .model nor"):
        tk.load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(DataError, match="holds neither"):
        tk.load_tokenizer(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        tk.load_tokenizer(tmp_path / "bad.model")


def test_train_cli(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(stdlib_texts(12)):
        (data / f"{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "tok"
    tk.main(["train", f"--input={data}", "--vocab_size=600", f"--output={out}"])
    assert "trained a 600-token BPE tokenizer on 12 documents" in capsys.readouterr().out
    tok = tk.load_tokenizer(out)
    assert tok.vocab_size == 600 and tok.decode(tok.encode(stdlib_texts(12)[3])) == stdlib_texts(12)[3]
    with pytest.raises(SystemExit, match="already holds tokenizer.model; pass --overwrite"):
        tk.main(["train", f"--input={data}", "--vocab_size=600", f"--output={out}"])
    with pytest.raises(SystemExit, match="cannot train a 100000-token model"):
        tk.main(["train", f"--input={data}", "--vocab_size=100000", f"--output={out}", "--overwrite"])
