"""`--plan`: the train step compiled ahead of time for a target (dsjax/train/plan.py, targets.py, plan_search.py).

Oracles: the trainer's own jitted step, lowered and compiled here, whose `memory_analysis()` the plan must report;
the FLOP formula worked out by hand for `tiny`; the TPU compiler's own out-of-memory verdict when the optional
`jax[tpu]` extra is installed.
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from dsjax import main as cli
from dsjax import sharding as shd
from dsjax.config import load_config
from dsjax.errors import ConfigError
from dsjax.train import plan, plan_search, targets
from dsjax.train.trainer import Trainer

HAS_TPU_COMPILER = importlib.util.find_spec("libtpu") is not None


@pytest.fixture(scope="module")
def tiny_plan():
    config = load_config("tiny")
    target = targets.lookup("cpu", jax.device_count())
    return config, plan.compile_plan(config, target, target.devices(), device_memory=2**30)


def test_plan_reports_the_trainers_compiled_step(tiny_plan, tmp_path):
    config, result = tiny_plan
    trainer = Trainer(config, tmp_path / "run")  # builds the jitted step; writes and allocates nothing
    gbs, seq = config.train.global_batch_size, config.train.seq_len
    dtypes = {"tokens": jnp.int32, "targets": jnp.int32, "loss_weights": jnp.float32, "segment_ids": jnp.int32,
              "positions": jnp.int32}
    batch = {k: jax.ShapeDtypeStruct((gbs, seq), d, sharding=trainer.batch_sharding) for k, d in dtypes.items()}
    with shd.use_rules(trainer.mesh, trainer.rules):
        mem = trainer.step_fn.lower(trainer.target, batch).compile().memory_analysis()
    b = result.record["bytes_per_device"]
    assert b["arguments"] == mem.argument_size_in_bytes
    assert b["temporaries"] == mem.temp_size_in_bytes
    assert b["outputs"] == mem.output_size_in_bytes
    assert b["aliases"] == mem.alias_size_in_bytes > 0  # the state is donated
    assert b["total"] == (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                          - mem.alias_size_in_bytes)
    assert b["arguments"] == b["params"] + b["opt_state"] + b["step"] + b["batch"]
    assert result.record["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert result.fits and not (tmp_path / "run").exists()


def test_plan_flops_match_the_hand_formula(tiny_plan):
    _, result = tiny_plan
    # tiny: d 128, 4 layers, 4 heads of 32, 2 kv heads, FFN 384, vocab 4096, 32 x 128 tokens per step.
    attention = 128 * 32 * (2 * 4 + 2 * 2)
    matmul_params = 4 * (attention + 3 * 128 * 384) + 128 * 4096
    per_token = 6 * matmul_params + 12 * 4 * 4 * 32 * 128
    assert per_token == 8_650_752
    assert result.record["flops_per_step"] == per_token * 32 * 128
    check = result.record["xla_flops_check"]  # XLA counts a scan body once; elementwise work adds a little
    assert 0.95 < check["ratio"] < 1.2


def test_plan_over_full_is_one_sentence_with_exit_3_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = cli.main(["dsjax.main", "--config=tiny", "--plan=cpu", "--plan_device_memory=0.01",
                     f"--plan_json={out}"])
    err = capsys.readouterr().err.strip()
    assert code == plan.NOT_FIT_EXIT
    assert err.count("\n") == 0 and "does not fit cpu" in err and "10.24 MiB" in err
    record = json.loads(out.read_text())
    for key in ("target", "devices", "mesh", "bytes_per_device", "device_memory", "fits", "flops_per_step",
                "predicted_step_s"):
        assert key in record
    assert set(record["bytes_per_device"]) >= {"arguments", "temporaries", "outputs", "aliases", "total"}
    assert record["fits"] is False and record["devices"] == 8


@pytest.mark.parametrize("args, words", [
    (["--plan=v5p128"], "did you mean v5p-128?"),
    (["--plan=h100x8x"], "did you mean h100x8?"),
    (["--plan=v5p-12"], "not a v5p slice size"),
    (["--plan=cpu", "--config.mesh.shape=3,1,1"], "mesh.shape=(3, 1, 1) does not match the 8 devices"),
    (["--plan=cpu", "--plan_mfu=1.5"], "--plan_mfu=1.5"),
])
def test_plan_bad_input_is_one_sentence(args, words, capsys):
    assert cli.main(["dsjax.main", "--config=tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.count("\n") == 0


def test_targets_table():
    v5p = targets.lookup("v5p-128")
    assert (v5p.devices_count, v5p.topology, v5p.memory_bytes) == (64, "v5p:4x4x4", 95 * 2**30)
    assert targets.lookup("v4-128").chip_config == "megacore"
    assert targets.lookup("v5e-256") == targets.lookup("v5litepod-256")
    h = targets.lookup("h100x64")
    assert (h.devices_count, h.topology, h.platform) == (64, "1x8x8", "gpu")
    assert "device_memory_size: 141000000000" in targets.lookup("h200x8").gpu.target_config()
    with pytest.raises(ConfigError, match="8 per host"):
        targets.lookup("h100")


def test_search_jumps_to_the_accumulation_that_fits(monkeypatch, capsys):
    monkeypatch.setattr(plan_search, "TENSOR_SPLITS", (1,))
    monkeypatch.setattr(plan_search, "REMATS", ("none",))
    config = load_config("tiny")
    target = targets.lookup("cpu", jax.device_count())
    # Measured for tiny on 8 CPU devices: about 60 MiB at grad_accum 1 and 37 MiB at 2.
    records = plan_search.search(config, target, target.devices(), mfu=0.4, device_memory=48 * 2**20)
    assert [(r["grad_accum_steps"], r["fits"]) for r in records] == [(1, False), (2, True)]
    assert "| 1 | (1, 8, 1) | none | 2 | 2 |" in capsys.readouterr().out


def test_search_helpers():
    assert plan_search._temporaries_from_error("... for HLO temporaries (518.14G) exceeds ...") == 518.14 * 2**30
    record = {"grad_accum_steps": 1, "xla_error": None,
              "bytes_per_device": {"temporaries": 60, "arguments": 10, "outputs": 10, "aliases": 10}}
    assert plan_search._next_accum(record, [1, 2, 4, 8], capacity=30) == 4  # 60 / 4 = 15 <= 30 - 10
    assert plan_search._next_accum(record, [1, 2, 4, 8], capacity=10) is None  # the state alone fills it
    config = load_config("67b")
    assert plan_search.meshes(config, targets.lookup("h100x64"), 64) == [
        (1, 64, 1), (8, 8, 1), (1, 32, 2), (8, 4, 2), (1, 16, 4), (8, 2, 4), (1, 8, 8), (8, 1, 8)]


@pytest.mark.skipif(not HAS_TPU_COMPILER, reason='needs the optional TPU compiler: pip install "jax[tpu]==0.10.2"')
def test_plan_compiles_for_tpu_and_reports_its_out_of_memory():
    config = load_config("tiny")
    target = targets.lookup("v5litepod-4")
    result = plan.compile_plan(config, target, target.devices())
    b = result.record["bytes_per_device"]
    assert result.fits and result.record["device_kind"] == "TPU v5 lite" and result.record["dtype"] == "bfloat16"
    assert b["arguments"] >= b["params"] + b["opt_state"] + b["batch"]  # TPU pads to its tiles
    big = config.copy_and_resolve_references()
    big.train.global_batch_size = 65536  # 16384 sequences per chip: 32 GiB of float32 logits alone
    result = plan.compile_plan(big, target, target.devices())
    assert not result.fits and "HBM" in result.record["xla_error"]
    assert "XLA says: " in plan.not_fit_sentence(result.record)
