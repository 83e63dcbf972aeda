"""The loop's promises: exact resume (also onto another mesh), corrupt checkpoints skipped, NaN stops, bad configs
refused before anything is allocated."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from dsjax.main import main
from dsjax.errors import CheckpointError, ConfigError
from dsjax.checkpoint import restore_model
from dsjax.train.checkpoint import TrainCheckpointer
from dsjax.train.trainer import NonFiniteError, train
from dsjax.train.optimizer import cosine_schedule, multistep_schedule, wsd_schedule
from tests.train_utils import SyntheticLoader, small_config, synthetic_task


def params_of(workdir):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(restore_model(workdir), nnx.Param)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full") / "run"
    train(small_config(), workdir, task=synthetic_task())
    return workdir


def _interrupted_copy(uninterrupted, tmp_path):
    """The uninterrupted run as it stood after step 2: its step-4 checkpoint removed, metrics trimmed."""
    workdir = tmp_path / "resumed"
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    return workdir


def test_resume_is_bit_exact(uninterrupted, tmp_path):
    workdir = _interrupted_copy(uninterrupted, tmp_path)
    train(small_config(), workdir, task=synthetic_task())
    for a, b in zip(params_of(workdir), params_of(uninterrupted)):
        assert np.array_equal(a, b)


def test_resume_onto_another_mesh(uninterrupted, tmp_path):
    workdir = _interrupted_copy(uninterrupted, tmp_path)
    config = small_config()
    config.mesh.shape = (2, 2, 2)
    train(config, workdir, task=synthetic_task())
    for a, b in zip(params_of(workdir), params_of(uninterrupted)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)  # another mesh reduces in another order


def test_corrupt_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path, capsys):
    workdir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, workdir)
    for path in (workdir / "checkpoints" / "4" / "params").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 7)  # truncated garbage
    train(small_config(), workdir, task=synthetic_task())
    out = capsys.readouterr().out
    assert "checkpoints/4 failed to restore" in out and "resumed from" in out and "checkpoints/2" in out
    assert "bound method" not in out
    assert (workdir / "checkpoints_failed").is_dir()  # kept for inspection, not deleted
    for a, b in zip(params_of(workdir), params_of(uninterrupted)):
        assert np.array_equal(a, b)


def test_all_checkpoints_corrupt_refuses_to_start_over(uninterrupted, tmp_path):
    workdir = tmp_path / "broken"
    shutil.copytree(uninterrupted, workdir)
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file() and path.parent.name in ("params", "d"):
            path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* restores"):
        train(small_config(), workdir, task=synthetic_task())


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    class PoisonAtThird(SyntheticLoader):
        def __next__(self):
            batch = super().__next__()
            if self.index == 3:
                batch["loss_weights"] = np.full_like(batch["loss_weights"], np.nan)
            return batch

    class PoisonTask(synthetic_task()):
        loader = PoisonAtThird

    task = PoisonTask
    with pytest.raises(NonFiniteError, match=r"at step 3 is not finite.*Last good checkpoint: .*checkpoints/2"):
        train(small_config(), tmp_path, task=task)
    assert TrainCheckpointer(tmp_path, 3).steps() == [2]


def test_inconsistent_batch_is_refused(tmp_path):
    config = small_config(global_batch_size=6)
    config.mesh.shape = (4, 1, 1)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=6 is not divisible by the data-parallel size 4 "
                                          r"times train.grad_accum_steps=1"):
        train(config, tmp_path, task=synthetic_task())
    config = small_config(seq_len=128)
    with pytest.raises(ConfigError, match="train.seq_len=128 exceeds the model's context, model.max_seq_len=64"):
        train(config, tmp_path, task=synthetic_task())


def test_workdir_of_another_model_is_refused(uninterrupted, tmp_path):
    workdir = tmp_path / "other"
    shutil.copytree(uninterrupted, workdir)
    config = small_config()
    config.model.d_ff = 128
    with pytest.raises(ConfigError, match="model.d_ff=128 differs from 96 of the run in"):
        train(config, workdir, task=synthetic_task())


def test_cli_refuses_67b_on_this_machine_before_allocating(tmp_path, capsys):
    assert main(["dsjax.main", "--config=67b", f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "config 67b does not fit" in err and "GiB per device" in err and "would fit on about" in err
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize("args,message", [
    (["--config.train.stepz=3"], "--config.train.stepz: train has no key 'stepz' (did you mean train.steps?)"),
    (["--config.train.steps=abc"], "--config.train.steps"),
    (["--config=nope"], "'nope' is neither a file nor one of the named configs"),
    (["--config.model.n_kv_heads=3"], "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
])
def test_cli_bad_config_is_one_sentence(args, message, capsys, tmp_path):
    assert main(["dsjax.main", *args, f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_schedules_by_hand():
    multistep = multistep_schedule(1.0, total_steps=100, warmup_steps=10)
    assert [float(multistep(s)) for s in (0, 9, 50, 79, 80, 89, 90, 99)] == pytest.approx(
        [0.1, 1.0, 1.0, 1.0, 0.316, 0.316, 0.1, 0.1])
    cosine = cosine_schedule(2.0, total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [float(cosine(s)) for s in (4, 10, 60, 110)] == pytest.approx([1.0, 2.0, 2.0 * (0.1 + 0.9 * 0.5), 0.2])
    wsd = wsd_schedule(1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2, min_ratio=0.0)
    assert [float(wsd(s)) for s in (50, 80, 90, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_metrics_file_has_the_documented_fields(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time"} <= set(records[-1])


def test_unset_lr_and_batch_come_from_the_scaling_laws(tmp_path, capsys):
    config = small_config(steps=3, global_batch_size=None)
    config.optim.lr = None
    config.mesh.shape = (2, 1, 1)
    train(config, tmp_path, task=synthetic_task())
    assert "scaling laws: lr" in capsys.readouterr().out
    chosen = json.loads((tmp_path / "config.json").read_text())
    batch, lr, seq = chosen["train"]["global_batch_size"], chosen["optim"]["lr"], 32
    m = 72 * 2 * 64**2 + 12 * 2 * 64 * seq  # the paper's M for 2 layers of width 64
    d_star = (3 * 0.2920 * m**0.3271) ** (1 / (1 - 0.3271))  # D = steps * B_opt(M * D), solved by hand
    assert batch % 2 == 0 and abs(batch - d_star / 3 / seq) <= 2  # whole sequences, a multiple of the data axis
    assert lr == pytest.approx(0.3118 * (m * d_star) ** -0.125, rel=0.01)


def test_export_hf_from_a_training_workdir(uninterrupted, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from dsjax.convert import main as convert

    assert convert(["export-hf", str(uninterrupted), str(tmp_path / "hf")]) == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.RandomState(0).randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(restore_model(uninterrupted)(tokens), ref, atol=1e-4)
