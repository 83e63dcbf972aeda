"""`python -m dsjax.main` as a user runs it, on the built-in corpus: SIGKILL and SIGTERM mid-run, then resume, end
bit-identical to an uninterrupted run on the same machine."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dsjax.checkpoint import restore_model
from dsjax.convert import main as convert
from dsjax.data.tokenizer import load_tokenizer
from dsjax.train.checkpoint import TrainCheckpointer

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
ARGS = [
    "--config=tiny",
    "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
    "--config.model.n_kv_heads=2", "--config.model.d_ff=128",
    f"--config.train.steps={STEPS}", "--config.train.seq_len=64", "--config.train.global_batch_size=8",
    "--config.optim.warmup_steps=3", "--config.checkpoint.every_steps=2", "--config.eval.every_steps=6",
    "--config.eval.steps=2", "--config.log.every_steps=1", "--config.log.progress_bar=False",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "DSJAX_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def start(workdir, env, *extra):
    return subprocess.Popen([sys.executable, "-m", "dsjax.main", *ARGS, *extra, f"--workdir={workdir}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def last_step(workdir) -> int:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def wait_for_step(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while last_step(workdir) < step:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "run did not reach the step in time"
        time.sleep(0.05)


def params(workdir):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(restore_model(workdir), nnx.Param)))


def check_export(workdir, out):
    """The workdir carries its tokenizer; export-hf writes its special ids and a directory others can read."""
    tok = load_tokenizer(workdir / "tokenizer.model")
    assert convert(["export-hf", str(workdir), str(out)]) == 0
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert convert(["export-hf", str(workdir), str(out)]) == 2  # exists: refused, and the message names the flag


def test_kill_and_resume_is_bit_identical(tmp_path, env):
    code, out = finish(start(tmp_path / "full", env, "--profile"))
    assert code == 0, out
    assert "eval_bpb" in out and "sample" in out
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents*"))
    assert any(p.is_file() for p in (tmp_path / "full" / "profile").rglob("*"))  # the --profile trace
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    baseline = [r for r in records if r["step"] == 0]  # evaluated before training: near-uniform logits
    assert len(baseline) == 1 and abs(baseline[0]["eval_loss"] - np.log(4096)) < 0.05
    check_export(tmp_path / "full", tmp_path / "hf")

    run = tmp_path / "interrupted"
    proc = start(run, env)
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGKILL)  # no chance to save: the resume starts from the last complete checkpoint
    proc.wait()
    killed_at = last_step(run)
    assert killed_at < STEPS

    proc = start(run, env)
    wait_for_step(proc, run, killed_at + 1)
    proc.send_signal(signal.SIGTERM)  # a clean stop: a checkpoint at the step it was on
    code, out = finish(proc)
    assert code == 143, out  # preempted, not done: a scheduler must see that the job did not finish
    assert "SIGTERM received: saved checkpoint" in out and "(preempted)" in out
    stopped_at = max(TrainCheckpointer(run, 3).steps())
    assert killed_at < stopped_at < STEPS

    code, out = finish(start(run, env))
    assert code == 0, out
    assert f"checkpoints/{stopped_at}" in out
    for a, b in zip(params(run), params(tmp_path / "full")):
        assert np.array_equal(a, b)
