"""SFT on the shared trainer: packing leaks nothing into the loss, an imported Hugging Face model fine-tunes the same
on 1 device and on a 2x2x2 mesh, greedy exact match and the repetition ratio are logged, bad setups refused."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from dsjax.checkpoint import restore_model
from dsjax.data import pipeline, prepare, synthetic
from dsjax.errors import ConfigError
from dsjax.eval.runtime import load as load_runtime
from dsjax.eval.scoring import Scorer
from dsjax.eval.tasks import parse_spec, run_task
from dsjax.eval.repetition import is_repetitive, repetition_ratio, repeated_tail
from dsjax.model import init_model
from dsjax.config import model_config
from dsjax.train.loss import next_token_loss
from dsjax.train.trainer import train
from tests.test_data_common import SPM_FILE, train_small_tokenizer
from tests.train_utils import small_config

VOCAB, SEQ = 512, 64


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = train_small_tokenizer(root, vocab_size=500)
    train_file, val_file = synthetic.write_jsonl(root / "raw", train_count=200, val_count=24, seed=0)
    prepare.prepare([str(train_file)], tok.path, root / "prepared", format="chat", val_inputs=[str(val_file)],
                    max_len=SEQ, progress=False, workers=1)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False))
    hf.save_pretrained(root / "hf", safe_serialization=True)
    return root


def held_out_text(root):
    path = root / "held_out.txt"
    if not path.exists():
        path.write_text("".join(f"User: What is {a} + {a}?\n\nAssistant: {2 * a}\n" for a in range(12)))
    return path


def sft_config(root, mesh_shape=(1, 1, 1), **sft):
    config = small_config(steps=3, global_batch_size=8, seq_len=SEQ)
    config.model.vocab_size = VOCAB
    config.task = "sft"
    config.train.init_from = str(root / "hf")
    config.data.datasets = str(root / "prepared")
    config.mesh.shape = mesh_shape
    config.eval.update(every_steps=3, steps=2)
    config.sft.update(**{"repetition_prompts": 4, "exact_match_examples": 4, "max_new_tokens": 4, **sft})
    return config


def batches(config, packing):
    loader = pipeline.make_loader(config, "val", seq_len=SEQ, global_batch_size=4, packing=packing)
    return list(loader)


def test_packed_loss_equals_one_conversation_per_row(chat_data):
    config = sft_config(chat_data)
    graphdef, params = nnx.split(init_model(model_config(config), seed=0))
    loss = jax.jit(lambda p, b: next_token_loss(nnx.merge(graphdef, p), b))
    sums = {}
    for packing in (True, False):
        out = [loss(params, b) for b in batches(config, packing)]
        sums[packing] = (sum(float(l) for l, _ in out), sum(float(w) for _, w in out))
    assert sums[True][1] == sums[False][1] > 0  # the same assistant tokens, however they are laid out
    assert sums[True][0] / sums[True][1] == pytest.approx(sums[False][0] / sums[False][1], rel=1e-5)


def records_of(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_imported_hf_model_fine_tunes_the_same_on_a_mesh(chat_data, tmp_path):
    results = {}
    for shape in ((1, 1, 1), (2, 2, 2)):
        workdir = tmp_path / f"run{shape[0]}"
        generate = shape == (1, 1, 1)  # greedy answers once: they cost compiles, and the mesh adds nothing to them
        config = sft_config(chat_data, shape, exact_match_examples=4 * generate, repetition_prompts=4 * generate)
        config.eval.tasks = f"bpb:{held_out_text(chat_data)}" if generate else ""
        train(config, workdir)
        results[shape] = (records_of(workdir), jax.tree.leaves(restore_model(workdir)))
    (ref_records, ref_params), (records, params) = results[(1, 1, 1)], results[(2, 2, 2)]
    for key in ("loss", "eval_loss"):
        a, b = [r[key] for r in ref_records if key in r], [r[key] for r in records if key in r]
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(b, a, rtol=1e-5)
    # As in test_train_sharding.py: after 3 Adam steps at lr 1e-2, reduction-order differences of near-zero
    # gradients show at a few 1e-5..1e-4; a sharding bug moves parameters by a whole step (~1e-2), and moves most of
    # them. Adam normalizes each gradient, so the odd embedding row whose near-zero gradient flips sign between the
    # two reduction orders moves by part of a step (0.0016 for 1 of 32768 entries on an AMX CPU, 2026-12-06).
    for a, b in zip(ref_params, params):
        a, b = np.asarray(a), np.asarray(b)
        close = np.isclose(b, a, atol=3e-4, rtol=1e-4)
        assert close.mean() >= 0.999, f"{(~close).sum()} of {close.size} entries differ"
        assert np.abs(b - a).max() < 1e-2  # less than one step anywhere
    # Greedy exact match and repetition ratio, before (step 0) and after (the end): logged under their names.
    steps = [r["step"] for r in ref_records if "exact_match" in r]
    assert steps == [0, 3] and all("repetition_ratio" in r for r in ref_records if "exact_match" in r)
    # eval.tasks ran dsjax.eval at the eval steps; the last equals dsjax.eval on the saved checkpoint.
    key = f"eval/bpb:{held_out_text(chat_data)}/bits_per_byte"
    logged = [r[key] for r in ref_records if key in r]
    assert len(logged) == 2
    runtime = load_runtime(tmp_path / "run1", mesh_shape=(1, 1, 1))
    scorer = Scorer(runtime.model, runtime.mesh, runtime.rules, batch_size=4)
    result = run_task(parse_spec(f"bpb:{held_out_text(chat_data)}"), scorer, runtime.tokenizer)
    assert logged[-1] == pytest.approx(result["metrics"]["bits_per_byte"], rel=1e-5)


def test_sft_refuses_a_missing_base_and_a_text_dataset(chat_data, tmp_path):
    config = sft_config(chat_data)
    config.train.init_from = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="train.init_from=.*nope does not exist"):
        train(config, tmp_path / "a")
    config = sft_config(chat_data)
    config.train.init_from = None
    with pytest.raises(ConfigError, match="train.init_from is not set"):
        train(config, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("text,period", [
    ("12 12 12 12 12 12", 3),           # a span repeated back to back fills the tail
    ("Sure: ab ab ab ab ab ab", 3),      # a different start, then the loop
    ("aaaa", 1),
    ("The answer is 42", None),          # ran out of tokens but does not loop
    ("abcab", None),                     # less than two copies at the end
    ("x y z x y", None),
])
def test_repeated_tail_on_hand_written_strings(text, period):
    assert repeated_tail(text) == period


def test_repetition_ratio_counts_only_unfinished_loops():
    texts = ["12 12 12 12 12 12", "12 12 12 12 12 12", "The answer is 42", "ok"]
    finished = [False, True, False, True]  # the second ended at eos: a finished answer is never repetitive
    assert [is_repetitive(t, f) for t, f in zip(texts, finished)] == [True, False, False, False]
    assert repetition_ratio(texts, finished) == 0.25


def test_exported_model_chats_in_transformers_with_our_prompt_ids(tmp_path):
    from transformers import AutoTokenizer

    from dsjax.convert import main as convert
    from dsjax.data import chat
    from dsjax.data.tokenizer import load_tokenizer
    from tests.test_eval_common import make_hf_dir

    make_hf_dir(tmp_path / "hf")
    assert convert(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 0
    assert convert(["export-hf", str(tmp_path / "ck"), str(tmp_path / "out")]) == 0
    ours = load_tokenizer(tmp_path / "ck" / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 4 + 4?"}]
    expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert chat.prompt_ids(ours, messages) == expected
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    out = hf.generate(torch.tensor([expected]), max_new_tokens=3, do_sample=False)
    assert out[0, : len(expected)].tolist() == expected and out.shape[1] > len(expected)


def test_demo_cache_is_keyed_by_its_counts(chat_data, tmp_path, monkeypatch):
    # A cache prepared with other counts must never be reused: tiny_sft's exact match reads the whole val split.
    from dsjax.train.tasks import sft

    config = sft_config(chat_data)
    config.data.cache_dir = str(tmp_path)
    tok_file = chat_data / SPM_FILE
    monkeypatch.setattr(sft, "SYNTHETIC_TRAIN", 30)
    counts = {}
    for val in (6, 9):
        monkeypatch.setattr(sft, "SYNTHETIC_VAL", val)
        out = sft.synthetic_dataset(config, tok_file, SEQ, log=lambda _: None)
        manifest = json.loads((out / prepare.MANIFEST).read_text())
        counts[out] = len(sft.held_out_pairs(pipeline.Source(out, manifest, None), 100))
    assert sorted(counts.values()) == [6, 9]
