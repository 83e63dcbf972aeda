"""The DPO task through the real trainer on a small prepared preference dataset, starting from (and referenced
against) a tiny random Hugging Face LlamaForCausalLM: log-probs against transformers, precomputed reference against
the frozen model, resume, 1 device against a 2x2x2 mesh, gradient accumulation against one batch."""

import json
import math
import shutil

import jax
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsjax.checkpoint import restore_model
from dsjax.data import pipeline, prepare
from dsjax.errors import ConfigError
from dsjax.interop.hf import load_model
from dsjax.train.tasks.dpo import METRICS, response_logps
from dsjax.train.tasks.dpo_reference import STORE_DIR
from dsjax.train.trainer import Trainer, train
from tests.test_data_common import train_small_tokenizer
from tests.train_utils import small_config

VOCAB, SEQ, BATCH = 512, 64, 8
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    tok = train_small_tokenizer(root, vocab_size=500, count=20)
    rows = [{"prompt": [U(f"What is {a} + {b}?")], "chosen": [A(str(a + b))], "rejected": [A(str(a + b + 1 + a % 3))]}
            for a in range(20) for b in range(3)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prepare.prepare([str(root / "pairs.jsonl")], tok.path, root / "prepared", format="preference",
                    val_fraction=0.2, progress=False, workers=1)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      rope_theta=10000.0, max_position_embeddings=SEQ, tie_word_embeddings=False,
                                      initializer_range=0.1)).eval()
    hf.save_pretrained(root / "hf", safe_serialization=True)
    return root, hf


def dpo_config(root, mesh=(1, 1, 1), **overrides):
    config = small_config()
    config.task = "dpo"
    config.model.update(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
    config.data.datasets = str(root / "prepared")
    config.train.update(init_from=str(root / "hf"), epochs=1, global_batch_size=BATCH, seq_len=SEQ)
    config.eval.update(every_steps=3, steps=0)
    config.optim.update(lr=1e-2, schedule="cosine", warmup_steps=1)
    config.mesh.shape = mesh
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def series(workdir, key):
    return [r[key] for r in records(workdir) if key in r]


@pytest.fixture(scope="module")
def base_run(assets, tmp_path_factory):
    root, _ = assets
    workdir = tmp_path_factory.mktemp("dpo_run") / "one"
    train(dpo_config(root), workdir)
    return workdir


def test_end_to_end_metrics_and_values_at_initialization(assets, base_run):
    root, _ = assets
    logged = records(base_run)
    steps = [r["step"] for r in logged if "loss" in r]
    per_epoch = pipeline.make_loader(dpo_config(root), "train", seq_len=SEQ, global_batch_size=BATCH,
                                     num_epochs=1).num_batches
    assert steps == list(range(1, per_epoch + 1))  # train.epochs=1
    for r in logged:
        if "loss" in r:
            assert all(k in r for k in METRICS)
    evals = [r for r in logged if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all(f"eval_{k}" in evals[0] for k in METRICS)
    # Step 0: the policy is the reference (train.init_from = the reference): loss log 2, rewards 0, accuracy 0.
    first = evals[0]
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[f"eval_{key}"]) < 1e-6
    assert first["eval_rewards/accuracies"] == 0.0 and first["eval_logps/chosen"] < 0
    assert logged[[r.get("step") for r in logged].index(1)]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval_rewards/margins"] != 0.0  # it trained


def test_logps_match_transformers(assets):
    """A response's log-prob is transformers' summed log-softmax of its reply tokens and eos, segment by segment."""
    root, hf = assets
    batch = next(pipeline.make_loader(dpo_config(root), "train", seq_len=SEQ, global_batch_size=BATCH, seed=3))
    got = jax.device_get(response_logps(load_model(root / "hf"), batch))
    checked = 0
    for row in range(BATCH):
        for s in sorted(set(batch["segment_ids"][row].tolist()) - {0}):
            mask = batch["segment_ids"][row] == s
            with torch.no_grad():
                logits = hf(torch.tensor(batch["tokens"][row][mask][None])).logits[0].double()
            logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(batch["targets"][row][mask])[:, None])[:, 0]
            expected = float((logp * torch.tensor(batch["loss_weights"][row][mask]).double()).sum())
            assert got["logps"][row, s - 1] == pytest.approx(expected, abs=1e-4)
            assert got["tokens"][row, s - 1] == batch["loss_weights"][row][mask].sum() > 0
            checked += 1
    assert checked > BATCH  # packed: several responses per row


def test_precomputed_reference_equals_the_frozen_model(assets, base_run, tmp_path):
    root, _ = assets
    (store,) = (base_run / STORE_DIR).iterdir()
    with np.load(store / "train-process0-of-1.npz") as f:
        stored = f["logps"]
    reference = load_model(root / "hf")
    loader = pipeline.make_loader(dpo_config(root), "train", seq_len=SEQ, global_batch_size=BATCH)
    for i in range(stored.shape[0]):
        fresh = np.asarray(response_logps(reference, next(loader))["logps"])
        np.testing.assert_allclose(stored[i], fresh[:, :stored.shape[2]], atol=1e-5)
        assert not fresh[:, stored.shape[2]:].any()
    # dpo.reference=model (a frozen copy in the train state) trains the same run.
    train(dpo_config(root, **{"dpo.reference": "model"}), tmp_path / "frozen")
    assert not (tmp_path / "frozen" / STORE_DIR).exists()
    assert not (tmp_path / "frozen" / "checkpoints" / "6" / "frozen").exists()  # restored from its own checkpoint
    for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins", "eval_rewards/chosen"):
        np.testing.assert_allclose(series(tmp_path / "frozen", key), series(base_run, key), rtol=1e-5, atol=1e-5)


def test_resume_reuses_the_stored_reference(assets, base_run, tmp_path, capsys):
    root, _ = assets
    workdir = tmp_path / "resumed"
    shutil.copytree(base_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    files = sorted((workdir / STORE_DIR).rglob("*.npz"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    train(dpo_config(root), workdir)
    out = capsys.readouterr().out
    assert "reference log-probs: reusing" in out and "stored in" not in out and "resumed from" in out
    assert [f.stat().st_mtime_ns for f in files] == mtimes and sorted((workdir / STORE_DIR).rglob("*.npz")) == files
    for a, b in zip(jax.tree.leaves(restore_model(base_run)), jax.tree.leaves(restore_model(workdir))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("variant", ["mesh_2x2x2", "grad_accum_2"])
def test_mesh_and_accumulation_give_the_same_numbers(assets, base_run, tmp_path, variant):
    root, _ = assets
    config = (dpo_config(root, mesh=(2, 2, 2)) if variant == "mesh_2x2x2"
              else dpo_config(root, **{"train.grad_accum_steps": 2, "eval.batch_size": BATCH}))
    train(config, tmp_path / variant)
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logits/chosen", "eval_loss",
                "eval_rewards/margins", "eval_logps/chosen"):
        # At step 1 the policy is the reference: c and r are rounding noise, and which of them is larger (the
        # strict accuracy) depends on the program's summation order; from step 2 on the margins decide it.
        skip = 1 if key == "rewards/accuracies" else 0
        np.testing.assert_allclose(series(tmp_path / variant, key)[skip:], series(base_run, key)[skip:], rtol=1e-5,
                                   atol=2e-5, err_msg=key)


def test_user_errors(assets, tmp_path):
    root, _ = assets
    with pytest.raises(ConfigError, match=r"^dpo needs a reference model: set train.init_from"):
        Trainer(dpo_config(root, **{"train.init_from": None}), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"^train.global_batch_size gives 8 rows per micro-batch, which must be a "
                                          r"multiple of 2 x the data-parallel size 8"):
        Trainer(dpo_config(root, mesh=(8, 1, 1)), tmp_path / "b").run()
    assert not (tmp_path / "b").exists()  # refused before anything was written
