"""lm-evaluation-harness: our `dsjax` model against lm-eval's own `hf` model on the same weights and local tasks.

Offline: the tasks are YAML files over JSONL in the test's temp dir, read by the `json` dataset builder.
"""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dsjax.eval.harness import DsjaxLM  # noqa: E402
from tests.test_eval_common import CORPUS, make_hf_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

MC_ROWS = [
    {"context": "The capital of France is", "choices": ["Paris", "Rome", "a big city in Italy"], "answer": 0},
    {"context": "Question: What color is the sky? Answer:", "choices": ["blue", "four", "the dog"], "answer": 0},
    {"context": "Numbers: 12 and", "choices": ["345", "6789", "cat"], "answer": 1},
    {"context": "def add(a, b):\n    return", "choices": ["a + b", "a - b"], "answer": 0},
    {"context": "The quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs away into the", "choices": ["forest", "sea"], "answer": 0},
]


def write_tasks(directory: Path) -> None:
    (directory / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    # Long enough that several 64-token windows are needed, short enough to stay fast.
    (directory / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS + [" ".join(CORPUS)]))
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "local_mc.yaml").write_text(
        "task: local_mc\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "local_rolling.yaml").write_text(
        "task: local_rolling\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {directory / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (directory / "gen.jsonl").write_text("".join(json.dumps({"prompt": r["context"], "answer": r["choices"][0]}) + "\n"
                                                 for r in MC_ROWS))
    (directory / "local_gen.yaml").write_text(
        "task: local_gen\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {directory / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 12\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")


def run(lm, directory):
    return lm_eval.simple_evaluate(model=lm, tasks=["local_mc", "local_rolling", "local_gen"], log_samples=True,
                                   task_manager=TaskManager(include_path=str(directory), include_defaults=False))


def responses(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [np.array(r[0] if isinstance(r[0], (list, tuple)) else r, dtype=float).ravel()
            for s in samples for r in s["resps"]]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    directory = tmp_path_factory.mktemp("harness")
    make_hf_dir(directory / "hf", seed=3)
    write_tasks(directory)
    hf = HFLM(pretrained=str(directory / "hf"), batch_size=4, device="cpu", dtype="float32")
    ours = DsjaxLM(checkpoint=str(directory / "hf"), batch_size=4)
    return run(hf, directory), run(ours, directory)


def test_loglikelihoods_and_accuracies_match_hf(both):
    theirs, ours = both
    for task in ("local_mc", "local_rolling"):
        a, b = responses(theirs, task), responses(ours, task)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            np.testing.assert_allclose(y[0], x[0], atol=1e-4, rtol=0)  # log-likelihood
            if len(x) > 1:
                assert bool(x[1]) == bool(y[1])  # is_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["local_mc"][metric] == theirs["results"]["local_mc"][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(ours["results"]["local_rolling"][metric],
                                   theirs["results"]["local_rolling"][metric], rtol=1e-5)


def test_generate_until_gives_hfs_greedy_text(both):
    theirs, ours = both
    text = lambda results: [s["resps"][0][0] for s in sorted(results["samples"]["local_gen"], key=lambda s: s["doc_id"])]
    assert text(ours) == text(theirs) and any(text(ours))


def test_harness_cli_runs_with_the_dsjax_model(both, tmp_path_factory, monkeypatch):
    """`python -m dsjax.eval.harness` is lm-eval's CLI with `dsjax` registered; model_args' batch_size wins over
    the CLI's own --batch_size. Run in-process (a subprocess would spend ~20 s importing jax, torch and lm-eval),
    with lm-eval's ~2000 built-in task configs left unindexed (16 s here)."""
    import functools

    import lm_eval.tasks

    from dsjax.eval import harness

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    directory = next(p for p in tmp_path_factory.getbasetemp().iterdir() if p.name.startswith("harness"))
    monkeypatch.setattr(sys, "argv", [
        "harness", "run", "--model", "dsjax", "--model_args", f"checkpoint={directory / 'hf'},batch_size=4",
        "--batch_size", "2", "--tasks", "local_mc", "--include_path", str(directory),
        "--output_path", str(directory / "out")])
    harness.main()
    found = list((directory / "out").rglob("results*.json"))
    assert found
    result = json.loads(found[0].read_text())
    assert result["results"]["local_mc"]["acc,none"] == both[0]["results"]["local_mc"]["acc,none"]
