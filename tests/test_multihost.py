"""Multi-process training through the real CLI: 2 and 4 local processes (a coordinator on 127.0.0.1, gloo CPU
collectives, 2 simulated devices each) train as one process with the same global batch and mesh shape does; a
checkpoint written by 2 processes resumes in 1 and in 4; export-hf from 2 processes, each holding only its shards,
writes the same files as one process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from dsjax.checkpoint import restore_model
from dsjax.convert import main as convert
from dsjax.data import prepare
from tests.test_data_common import stdlib_texts, train_small_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
TIMEOUT = 240  # seconds for one launch of all its processes
ARGS = [
    "--config=tiny",
    "--config.model.vocab_size=1024", "--config.model.d_model=32", "--config.model.n_layers=2",
    "--config.model.n_heads=2", "--config.model.n_kv_heads=1", "--config.model.d_ff=64",
    "--config.train.seq_len=32", "--config.train.global_batch_size=8", "--config.mesh.shape=(-1,2,1)",
    "--config.optim.lr=1e-2", "--config.optim.warmup_steps=1", "--config.checkpoint.every_steps=2",
    "--config.eval.every_steps=4", "--config.eval.steps=1",
    "--config.log.every_steps=1", "--config.log.progress_bar=False", "--config.log.tensorboard=False",
    "--config.log.sample_tokens=0",
]
# The same programs on the same mesh shape; only where the collectives run differs (gloo across processes), which
# changes the order of float32 sums. Losses agree to 1e-5 relative. Parameters are compared by the norm of the
# difference per tensor, relative to the tensor's: Adam's first steps, lr * m / sqrt(v), turn ulp-level gradient
# differences into visible ones on single entries whose gradient is near zero (2e-4 absolute between two
# single-process meshes here), while the tensor as a whole agrees to ~1e-5. A wrong share of the data or a missing
# reduction moves the loss in the third digit and whole tensors by percent.
RTOL, PARAM_RTOL = 1e-5, 3e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_data")
    tok = train_small_tokenizer(root)
    write_jsonl(root / "docs.jsonl", [p for t in stdlib_texts(30) for p in t.split("\n\n") if p.strip()])
    prepare.prepare([str(root / "docs.jsonl")], tok.path, root / "prepared", val_fraction=0.1, progress=False)
    return root / "prepared"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache shared by the launches: a resume compiles what an earlier run did."""
    global CACHE
    CACHE = tmp_path_factory.mktemp("jax_cache")


CACHE = None


def launch(module_args, processes: int, devices: int, timeout=TIMEOUT) -> list[str]:
    """Runs `python -m <module_args>` as `processes` processes of `devices` CPU devices each; all must exit 0. On
    failure or timeout every child (and its process group) is killed."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(CACHE),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    extra = lambda i: []  # noqa: E731
    if processes > 1:
        port = _free_port()
        extra = lambda i: ["--distributed", f"--coordinator_address=127.0.0.1:{port}",  # noqa: E731
                           f"--num_processes={processes}", f"--process_id={i}"]
    children = [subprocess.Popen([sys.executable, "-m", *module_args, *extra(i)], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
                for i in range(processes)]
    outs = []
    try:
        for child in children:
            outs.append(child.communicate(timeout=timeout)[0])
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    codes = [child.returncode for child in children]
    assert codes == [0] * processes, "\n\n".join(f"--- process {i} (exit {c}):\n{o[-3000:]}"
                                                 for i, (c, o) in enumerate(zip(codes, outs)))
    return outs


def train(workdir, dataset, processes, devices, steps=STEPS):
    return launch(["dsjax.main", *ARGS, f"--config.data.datasets={dataset}", f"--config.train.steps={steps}",
                   f"--workdir={workdir}"], processes, devices)


def curve(workdir) -> dict[int, dict]:
    """metrics.jsonl by step (a resumed run's later lines win): loss, and eval_loss where evaluated."""
    out: dict[int, dict] = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k in ("loss", "eval_loss")})
    return out


def params(workdir):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(restore_model(workdir), nnx.Param)))


def assert_same_run(workdir, reference, steps=range(1, STEPS + 1)):
    got, want = curve(workdir), curve(reference)
    for step in steps:
        assert set(got[step]) == set(want[step]), step
        for key in want[step]:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=RTOL, err_msg=f"{key} at step {step}")
    for a, b in zip(params(workdir), params(reference)):
        assert np.linalg.norm(a - b) <= PARAM_RTOL * np.linalg.norm(b), (np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """One process on 4 and on 8 devices (the references), and 2 processes of 2 devices with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("multihost")
    train(root / "one4", dataset, 1, 4)
    train(root / "one8", dataset, 1, 8)
    out = train(root / "two", dataset, 2, 2)
    return root, out


def test_two_processes_train_as_one(runs):
    root, outs = runs
    assert "'data': 2, 'fsdp': 2" in outs[0]  # the mesh of the reference, over both processes' devices
    assert "step 4:" in outs[0] and "step 4:" not in outs[1]  # process 0 logs for the run
    assert "done: step 4" in outs[0] and "done:" not in outs[1]  # and prints the one summary line
    assert_same_run(root / "two", root / "one4", steps=[0, 1, 2, 3, 4])
    assert sorted(int(p.name) for p in (root / "two" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def _from_step_two(root, name) -> Path:
    """A copy of the 2-process run with only its step-2 checkpoint (and metrics up to it)."""
    workdir = root / name
    shutil.copytree(root / "two", workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    return workdir


def test_checkpoint_of_two_processes_resumes_in_one_and_in_four(runs, dataset):
    root, _ = runs
    one = _from_step_two(root, "resumed_one")
    out = train(one, dataset, 1, 4)
    assert "resumed from" in out[0] and "checkpoints/2" in out[0]
    assert_same_run(one, root / "one4", steps=[3, 4])
    four = _from_step_two(root, "resumed_four")
    out = train(four, dataset, 4, 2)
    assert "'data': 4, 'fsdp': 2" in out[0] and "checkpoints/2" in out[0]
    assert_same_run(four, root / "one8", steps=[3, 4])  # steps 1-2 ran on 4 devices, within rounding of 8


def test_export_hf_from_two_processes_holding_shards(runs, tmp_path):
    root, _ = runs
    assert convert(["export-hf", str(root / "two"), str(tmp_path / "one")]) == 0
    outs = launch(["dsjax.convert", "export-hf", str(root / "two"), str(tmp_path / "two")], 2, 2)
    assert "exported" in outs[0] and "exported" not in outs[1]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    want, got = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
