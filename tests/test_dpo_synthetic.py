"""The tiny_dpo demo's on-policy pairs: labelling by correctness on hand-written answers, and the whole path
(sample from the SFT model, label, prepare, train with exact match before and after) on a small random model."""

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsjax.data import prepare, synthetic
from dsjax.errors import ConfigError
from dsjax.train.tasks.dpo_synthetic import label_pairs, synthetic_pairs
from dsjax.train.trainer import Trainer, train
from tests.test_data_common import train_small_tokenizer
from tests.train_utils import small_config


def example(answer):
    return synthetic.Example("add", "What is 1 + 1?", answer)


def test_label_pairs_by_hand():
    examples = [example("2"), example("2"), example("2"), example("2")]
    answers = [["2", "3", "3", "4"],  # right and wrong: chosen the right one, rejected the commonest mistake
               ["5", "5", "", "6"],  # none right: the reference is chosen; an empty reply is never a rejected one
               ["2", "2", "2", "2"],  # always right: no pair
               ["2", "2", "7", "2"]]
    rows, stats = label_pairs(examples, answers)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("2", "3"), ("2", "5"),
                                                                                       ("2", "7")]
    assert all(r["prompt"] == [{"role": "user", "content": "What is 1 + 1?"}] for r in rows)
    assert stats == {"samples": 16, "right_samples": 8, "all_right": 1, "reference_chosen": 1, "pairs": 3}


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A random Hugging Face model with a tokenizer beside it, standing in for the tiny_sft result."""
    root = tmp_path_factory.mktemp("dpo_synthetic")
    tok = train_small_tokenizer(root, vocab_size=500, count=20)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                      max_position_embeddings=128, tie_word_embeddings=False))
    hf.save_pretrained(root / "sft", safe_serialization=True)
    shutil.copy(tok.path, root / "sft")
    return root


def demo_config(root, **dpo):
    config = small_config()
    config.task = "dpo"
    config.model.update(vocab_size=512, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)
    config.data.update(datasets="synthetic", cache_dir=str(root / "cache"))
    config.train.update(init_from=str(root / "sft"), steps=2, global_batch_size=8, seq_len=64)
    config.eval.update(every_steps=2, steps=0)
    config.mesh.shape = (1, 1, 1)
    config.dpo.update(synthetic_prompts=12, synthetic_val_prompts=6, synthetic_samples=2, exact_match_examples=6,
                      max_new_tokens=8, **dpo)
    return config


def test_demo_pairs_train_and_are_reused(sft_model, tmp_path, capsys):
    result = train(demo_config(sft_model), tmp_path / "run")
    assert result["step"] == 2
    out = capsys.readouterr().out
    assert "sampling 2 answers to 12 training and 6 held-out problems" in out
    [prepared] = [p for p in (sft_model / "cache").iterdir() if not p.name.endswith("-jsonl")]
    manifest = json.loads((prepared / prepare.MANIFEST).read_text())
    val_rows = [json.loads(line) for line in (prepared.with_name(prepared.name + "-jsonl") / "val.jsonl").open()]
    assert manifest["splits"]["val"]["pairs"] == len(val_rows) > 0
    # Held-out pairs come from the held-out problems SFT's exact match reads, in that order.
    held_out = [e.messages for e in synthetic.examples("val", 6)]
    assert all(r["prompt"] in held_out for r in val_rows)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], [r for r in records if "exact_match" in r][-1]
    assert first["step"] == 0 and "exact_match" in first and "eval_rewards/accuracies" in first
    assert 0.0 <= last["exact_match"] <= 1.0 and "repetition_ratio" in last and last is not first
    # The same SFT model and settings reuse the pairs.
    assert synthetic_pairs(demo_config(sft_model)) == prepared
    assert "sampling" not in capsys.readouterr().out


def test_demo_refusals(sft_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = demo_config(sft_model)
    config.train.init_from = "runs/tiny_sft"
    with pytest.raises(ConfigError, match=r"^train.init_from=runs/tiny_sft does not exist \(run the SFT stage "
                                          r"first: python -m dsjax.main --config=tiny_sft\)"):
        Trainer(config, tmp_path / "a")
    config = demo_config(sft_model)
    config.data.datasets = str(tmp_path)
    with pytest.raises(ConfigError, match=r"^dpo.exact_match_examples needs data.datasets=synthetic"):
        Trainer(config, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
