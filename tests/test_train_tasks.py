"""A task defined here, not in dsjax: a loss with an extra `aux` metric that reads a `frozen` subtree, run through
the real trainer on 1 device and on a 2x2x2 mesh."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dsjax.checkpoint import restore_model
from dsjax.config import model_config
from dsjax.model import init_model
from dsjax.train.loss import cross_entropy
from dsjax.train.tasks import Frozen
from dsjax.train.trainer import Trainer, train
from tests.train_utils import SyntheticLoader, SyntheticTask, small_config


def probe_vector(d):
    return np.random.RandomState(7).randn(d).astype(np.float32)


class ProbeTask(SyntheticTask):
    """Next-token loss; aux `probe_score`: the weighted sum of hidden . probe, probe a frozen (d_model,) vector."""

    save_frozen = True

    def frozen(self, model_cfg):
        d = model_cfg.d_model
        return Frozen(abstract={"probe": jax.ShapeDtypeStruct((d,), jnp.float32)}, axes={"probe": ("embed",)},
                      load=lambda shardings: {"probe": jax.device_put(probe_vector(d), shardings["probe"])},
                      save=self.save_frozen)

    def loss(self, model, batch, frozen):
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        weights = batch["loss_weights"].astype(jnp.float32)
        loss = jnp.sum(cross_entropy(model.logits(hidden), batch["targets"]) * weights)
        score = jnp.einsum("bsd,d->bs", hidden.astype(jnp.float32), frozen["probe"])
        return loss, jnp.sum(weights), {"probe_score": jnp.sum(score * weights)}


class UnsavedProbeTask(ProbeTask):
    save_frozen = False


def config_for(mesh_shape):
    config = small_config(steps=4)
    config.mesh.shape = mesh_shape
    config.eval.update(every_steps=2, steps=2)
    return config


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("probe") / "one"
    train(config_for((1, 1, 1)), workdir, task=ProbeTask)
    return workdir


def test_aux_metric_is_logged_and_equals_its_formula(one_device):
    logged = records(one_device)
    train_steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in train_steps] == [1, 2, 3, 4] and all("probe_score" in r for r in train_steps)
    assert [r["step"] for r in logged if "eval_probe_score" in r] == [0, 2, 4]
    # Step 1's aux is computed on the initial parameters and the first batch: recompute it outside the trainer.
    config = config_for((1, 1, 1))
    model = init_model(model_config(config), seed=config.seed)
    batch = next(SyntheticLoader(config.seed, "train", 32, 8, 0, 1))
    hidden = np.asarray(model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)
    weights = batch["loss_weights"].astype(np.float64)
    expected = np.sum(hidden @ probe_vector(64).astype(np.float64) * weights) / np.sum(weights)
    assert train_steps[0]["probe_score"] == pytest.approx(expected, rel=1e-5)


def test_mesh_gives_the_same_numbers(one_device, tmp_path):
    trainer = Trainer(config_for((2, 2, 2)), tmp_path / "mesh", task=ProbeTask)
    assert trainer.shardings["frozen"]["probe"].spec == PartitionSpec("fsdp")  # split like the params' embed axis
    trainer.run()
    ref, got = records(one_device), records(tmp_path / "mesh")
    # The probe score is a mean of terms of size ~|h| |probe| ~ 64 that cancel to ~0.1: compare it at 1e-5 of
    # that term size (sharding reorders reductions; after 3 Adam steps parameters differ at ~1e-5 relative).
    for key, atol in (("loss", 1e-6), ("probe_score", 64e-5), ("eval_loss", 1e-6), ("eval_probe_score", 64e-5)):
        a = [r[key] for r in ref if key in r]
        b = [r[key] for r in got if key in r]
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("task", [ProbeTask, UnsavedProbeTask])
def test_frozen_is_not_trained_and_resumes(one_device, tmp_path, task):
    workdir = tmp_path / "resumed"
    if task is ProbeTask:
        shutil.copytree(one_device, workdir)
    else:
        train(config_for((1, 1, 1)), workdir, task=task)
        assert not (workdir / "checkpoints" / "4" / "frozen").exists()  # the task loads it itself
    assert (workdir / "checkpoints" / "4" / "frozen").exists() == (task is ProbeTask)
    shutil.rmtree(workdir / "checkpoints" / "4")
    trainer = Trainer(config_for((1, 1, 1)), workdir, task=task)
    trainer.run()
    ref, got = jax.tree.leaves(restore_model(one_device)), jax.tree.leaves(restore_model(workdir))
    for a, b in zip(ref, got):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert records(workdir)[-1]["eval_probe_score"] == records(one_device)[-1]["eval_probe_score"]
