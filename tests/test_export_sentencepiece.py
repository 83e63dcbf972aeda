"""export-hf of a sentencepiece tokenizer.model: the tokenizer.json it writes gives sentencepiece's ids on every input
(through `tokenizers`, dsjax's Hugging Face loader and transformers' AutoTokenizer), transformers chats with our
prompt ids and generates like dsjax.generate; models a Hugging Face BPE cannot reproduce are refused."""

import json
import shutil

import pytest
import sentencepiece as spm
import tokenizers
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaForCausalLM

from dsjax import checkpoint
from dsjax.convert import main as convert
from dsjax.data import chat
from dsjax.data import tokenizer as tk
from dsjax.errors import DataError
from dsjax.generate import generate
from dsjax.interop import sentencepiece_hf
from dsjax.model import ModelConfig, Transformer
from tests.test_data_common import stdlib_texts, train_small_tokenizer
from tests.test_data_tokenizer import TRICKY

MODEL_VOCAB = 1024  # the 1000-token tokenizer padded to a multiple of 128, as dsjax sizes model.vocab_size
NEW_TOKENS = 6

TEXTS = TRICKY + [
    "import os\n\n\nclass A:\n    def f(self):\n\n        if x:\n\t\treturn 1\n        return 2\n\n",
    " ", "  ", "\t", "\n", "\n\n\n\n\n", " \n \n", "\t \t  \t\n", "x" + " " * 37 + "y", " " * 100, "\t" * 9,
    "a\n\n\n\n\nb", "   spaces at both ends   ", "0", "007", "3.14159 -2e10 1,000,000 0b1011", "x1y22z333",
    "naïve café résumé Ångström", "日本語の文章と中文句子", "👍🏽🇫🇷 ok 🤖", "\ufffd replacement",
    "\u2581", "\u2581\u2581 ", " \u2581x\u2581 ", "<0x41><0xE2>", "<unk><pad>", tk.BOS, tk.EOS, tk.PAD,
    f"{tk.BOS}User: hi\n\nAssistant:{tk.EOS}",
]
text_strategy = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)
# Code-like text: runs of spaces, tabs and newlines around pieces of the vocabulary and digits, where merges compete.
CODE_BITS = [" ", "  ", "    ", "\t", "\n", "self", ".", "_", "(", "):", "=", "1", "0", "return", "def", "é", "中",
             "\u2581", "the", "in", "'"]
code_strategy = st.lists(st.sampled_from(CODE_BITS), max_size=40).map("".join)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "You are terse.  "}, {"role": "user", "content": "def f(x):\n    return x\n"},
     {"role": "assistant", "content": "It returns x."}, {"role": "user", "content": "Und auf Deutsch? 中文 😀"}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "\n\n42"},
     {"role": "user", "content": "\u2581 and 12345"}],
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run's workdir, laid out as the trainer leaves it (checkpoints/, tokenizer.model), and its export-hf.

    The output head's padding rows (ids past the tokenizer's 1000) are 3x the rows of the tokens greedy decoding
    picks, so a generate that did not suppress them would pick a padding id; dsjax never samples them.
    """
    root = tmp_path_factory.mktemp("export")
    ours = train_small_tokenizer(root / "tok")
    workdir = root / "run"
    cfg = ModelConfig(vocab_size=MODEL_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=128, init_std=0.2)
    model = Transformer(cfg, nnx.Rngs(0))
    greedy = generate(model, ours, [chat.prompt_ids(ours, CONVERSATIONS[0])], max_new_tokens=NEW_TOKENS).ids[0]
    head = model.lm_head[...]
    model.lm_head[...] = head.at[:, ours.vocab_size: ours.vocab_size + len(greedy)].set(3 * head[:, greedy])
    checkpoint.save_params(model, workdir / "checkpoints", meta={"tokenizer": ours.describe()})
    shutil.copyfile(ours.path, workdir / tk.SPM_FILE)
    assert convert(["export-hf", str(workdir), str(root / "hf")]) == 0
    return {"ours": ours, "model": model, "out": root / "hf"}


@pytest.fixture(scope="module")
def theirs(run):
    """The exported tokenizer three ways: `tokenizers` (special-token text read as text, as dsjax does), dsjax's
    Hugging Face loader, and transformers' AutoTokenizer."""
    raw = tokenizers.Tokenizer.from_file(str(run["out"] / tk.HF_FILE))
    raw.encode_special_tokens = True
    return {"raw": raw, "dsjax": tk.load_tokenizer(run["out"] / tk.HF_FILE),
            "auto": AutoTokenizer.from_pretrained(run["out"])}


def check_same_ids(ours, theirs, text):
    want = ours.encode(text)
    assert theirs["raw"].encode(text, add_special_tokens=False).ids == want, text
    assert theirs["dsjax"].encode(text) == want, text
    auto = theirs["auto"](text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert auto == want, text
    if ours.decode(want) == text:
        assert theirs["raw"].decode(want) == text
        assert theirs["auto"].decode(want) == text


def test_ids_equal_sentencepiece_on_tricky_text_and_unseen_code(run, theirs):
    ours = run["ours"]
    texts = TEXTS + list(stdlib_texts(70)[40:])  # the tokenizer trained on the first 40 files
    for text in texts:
        check_same_ids(ours, theirs, text)
    assert theirs["dsjax"].encode_batch(texts) == ours.encode_batch(texts)
    # Every corner the recipe has is reached: byte fallback, the newline symbol, long whitespace pieces, digits.
    ids = ours.encode("".join(TEXTS))
    pieces = [ours._sp.id_to_piece(i) for i in ids]
    assert any(ours._sp.is_byte(i) for i in ids) and "\n" in pieces and "\u2581" * 8 in pieces
    texts_of_ids = [ours.decode([i]) for i in ids]
    assert "7" in texts_of_ids and all(len(t) == 1 for t in texts_of_ids if any(c.isdigit() for c in t))


@settings(max_examples=150, deadline=None)
@given(text=text_strategy)
def test_ids_equal_sentencepiece_property(run, theirs, text):
    check_same_ids(run["ours"], theirs, text)


@settings(max_examples=150, deadline=None)
@given(text=code_strategy)
def test_ids_equal_sentencepiece_on_code_like_text(run, theirs, text):
    check_same_ids(run["ours"], theirs, text)


def test_special_tokens_and_bos_in_transformers(run, theirs):
    ours, auto = run["ours"], theirs["auto"]
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert auto.get_vocab() == theirs["raw"].get_vocab() and len(auto) == ours.vocab_size
    # Special-token text is the special id in transformers (the chat template relies on it), text in dsjax.
    assert auto(f"{tk.BOS}x{tk.EOS}", add_special_tokens=False)["input_ids"] == [ours.bos_id] + ours.encode("x") + [
        ours.eos_id]
    # A plain prompt gets bos prepended, as dsjax.generate does and every training document starts.
    assert auto("def f(x):\n")["input_ids"] == [ours.bos_id] + ours.encode("def f(x):\n")
    config = json.loads((run["out"] / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat.JINJA_TEMPLATE and config["bos_token"] == tk.BOS


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_apply_chat_template_equals_our_prompt_ids(run, theirs, messages):
    expected = theirs["auto"].apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert chat.prompt_ids(run["ours"], messages) == expected


def test_transformers_generates_like_dsjax(run, theirs):
    ours = run["ours"]
    generation = json.loads((run["out"] / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(ours.vocab_size, MODEL_VOCAB))
    hf = LlamaForCausalLM.from_pretrained(run["out"]).eval()
    prompt = theirs["auto"].apply_chat_template(CONVERSATIONS[0], tokenize=True, add_generation_prompt=True)
    prompt = torch.tensor([list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)])

    def hf_greedy(**kwargs):
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)[0, prompt.shape[1]:]
        out = out.tolist()
        return out[: out.index(ours.eos_id)] if ours.eos_id in out else out

    out = hf_greedy()
    assert out == generate(run["model"], ours, [prompt[0].tolist()], max_new_tokens=NEW_TOKENS).ids[0]
    assert theirs["auto"].decode(out) == ours.decode(out)
    assert hf_greedy(suppress_tokens=[])[0] >= ours.vocab_size  # the padding ids win unless suppressed


def _train(tmp_path, **changes):
    """A small sentencepiece model trained with the recipe, some options changed."""
    recipe = dict(tk.SPM_RECIPE, **changes)
    path = tmp_path / f"{'-'.join(map(str, changes.values()))}.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(stdlib_texts(8)), model_writer=f, vocab_size=600,
                                       num_threads=1, **recipe)
    return path


@pytest.mark.parametrize("changes,reason", [
    ({"model_type": "unigram"}, "is a UNIGRAM model, not BPE"),
    ({"normalization_rule_name": "nmt_nfkc"}, "normalizes text"),
    ({"add_dummy_prefix": True}, "adds a dummy prefix space"),
    ({"byte_fallback": False}, "has no byte fallback"),
])
def test_models_outside_the_recipe_are_refused(tmp_path, changes, reason):
    path = _train(tmp_path, **changes)
    with pytest.raises(DataError, match=reason) as err:
        sentencepiece_hf.convert(path)
    assert str(path) in str(err.value)


def test_not_a_model_and_an_inexact_conversion_are_refused(run, tmp_path, monkeypatch):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x07not a protobuf")
    with pytest.raises(DataError, match="junk.model is not a sentencepiece model"):
        sentencepiece_hf.convert(junk)
    # The converter checks itself against sentencepiece: with one merge missing it refuses, naming the text.
    merges = sentencepiece_hf._merges
    monkeypatch.setattr(sentencepiece_hf, "_merges", lambda path, normal: merges(path, normal)[1:])
    with pytest.raises(DataError, match="cannot be converted exactly: sentencepiece encodes '  ' as"):
        sentencepiece_hf.convert(run["ours"].path)


def test_export_without_an_exact_tokenizer_warns_and_leaves_it_out(run, tmp_path, capsys):
    workdir = tmp_path / "run"
    checkpoint.save_params(run["model"], workdir / "checkpoints")
    shutil.copyfile(_train(tmp_path, add_dummy_prefix=True), workdir / tk.SPM_FILE)
    assert convert(["export-hf", str(workdir), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "adds a dummy prefix space" in err and len(err.splitlines()) == 1
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / "hf" / tk.HF_FILE).exists()
