"""What a new user runs into with `python -m dsjax.main`: help, a wrong dataset, a dataset without held-out
documents, a workdir whose checkpoints are all corrupt, a finished run started again, whitespace-only samples."""

import io

import pytest

from dsjax.data import prepare
from dsjax.errors import CheckpointError
from dsjax.main import main
from dsjax.train.tasks.pretrain import PretrainTask
from dsjax.train.trainer import train
from tests.test_data_common import stdlib_texts, train_small_tokenizer, write_jsonl
from tests.train_utils import small_config, synthetic_task

SMALL = ["--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=96",
         "--config.train.steps=2", "--config.train.seq_len=32", "--config.train.global_batch_size=4",
         "--config.log.progress_bar=False", "--config.mesh.shape=(1,1,1)"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_flags_configs_and_where_keys_are(flag, capsys):
    assert main(["dsjax.main", flag]) == 0
    out = capsys.readouterr().out
    for expected in ("--config=NAME", "--workdir", "--restart", "--profile", "--distributed", "tiny", "7b", "67b",
                     "dsjax/config.py"):
        assert expected in out


def _one_sentence(err: str, *needles):
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_dataset_is_refused_before_anything_is_written(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["dsjax.main", *SMALL, "--config.data.datasets=/no/such/dir", f"--workdir={workdir}"]) == 2
    _one_sentence(capsys.readouterr().err, "/no/such/dir")
    assert not workdir.exists()


def test_dataset_without_val_documents_is_refused_at_start(tmp_path, capsys):
    tok = train_small_tokenizer(tmp_path, vocab_size=500, count=10)
    data = write_jsonl(tmp_path / "docs.jsonl", stdlib_texts(10)[:3])
    log = io.StringIO()
    # 3 documents at 1%: by their text hashes none is held out; prepare says so, naming the flag.
    prepare.prepare([str(data)], tok.path, tmp_path / "ds", val_fraction=0.01, progress=False, log=log)
    assert "warning: --val_fraction=0.01 held out no document" in log.getvalue()
    workdir = tmp_path / "run"
    args = [*SMALL, f"--config.data.datasets={tmp_path / 'ds'}", "--config.model.vocab_size=512",
            "--config.eval.every_steps=1", f"--workdir={workdir}"]
    assert main(["dsjax.main", *args]) == 2
    _one_sentence(capsys.readouterr().err, "has no val documents", "--val_fraction", "eval.every_steps=0")
    assert not workdir.exists()


def test_all_checkpoints_corrupt_keeps_refusing_until_restart(tmp_path, capsys):
    workdir = tmp_path / "run"
    train(small_config(), workdir, task=synthetic_task())
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file() and path.parent.name in ("params", "d"):
            path.write_bytes(b"")
    for attempt in range(2):  # the first attempt moves them aside; the second must not start from scratch
        with pytest.raises(CheckpointError, match="pass --restart to start this run over"):
            train(small_config(), workdir, task=synthetic_task())
    assert not any((workdir / "checkpoints").iterdir()) and any((workdir / "checkpoints_failed").iterdir())
    capsys.readouterr()
    result = train(small_config(), workdir, task=synthetic_task(), restart=True)
    assert result["step"] == 4
    assert "--restart: the previous run's checkpoints and metrics are now in" in capsys.readouterr().out
    previous = list(workdir.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "checkpoints_failed").is_dir()  # kept, not deleted


def test_finished_run_started_again_says_it_is_finished(tmp_path, capsys):
    train(small_config(), tmp_path, task=synthetic_task())
    capsys.readouterr()
    result = train(small_config(), tmp_path, task=synthetic_task())
    out = capsys.readouterr().out
    assert "is already finished (step 4 of 4)" in out and "resumed from" not in out
    assert result["step"] == 4 and "loss" not in result

    # A damaged array chunk: the report carries TensorStore's own sentence, not its wrapper's method repr.
    for path in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"\0" * 7)
    config = small_config(steps=5)
    train(config, tmp_path, task=synthetic_task())
    out = capsys.readouterr().out
    assert "checkpoints/4 failed to restore (ValueError: OUT_OF_RANGE: Error " in out and "OCDBT" in out, out
    assert "bound method" not in out and "resumed from" in out


def test_whitespace_samples_are_explained(monkeypatch):
    config = small_config()
    config.log.samples = ("def ", "class ")
    task = PretrainTask(config)
    monkeypatch.setattr(task, "complete", lambda model, prompts, n: ["\n\n\n", "Foo:"])
    lines = []
    task.report(None, None, lines.append)
    assert "only whitespace" in lines[0] and "'\\n\\n\\n'" in lines[0] and "after 4 steps" in lines[0]
    assert lines[1] == "--- sample: 'class '\nclass Foo:"


def test_ctrl_c_before_training_starts_is_one_sentence(monkeypatch, capsys, tmp_path):
    import dsjax.train.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises while data is prepared or the step compiles

    monkeypatch.setattr(trainer, "train", interrupted)
    assert main(["dsjax.main", *SMALL, f"--workdir={tmp_path / 'run'}"]) == 130
    err = capsys.readouterr().err
    assert "interrupted before training started" in err and "Traceback" not in err
