"""dsjax.eval against transformers: multiple choice under each normalization, bits-per-byte over rolling windows,
the scoring core on meshes, and the CLI's answers to bad input."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from dsjax.eval import __main__ as cli
from dsjax.eval import bpb, multiple_choice, packing, runtime, scoring, tasks
from dsjax.eval.windows import rolling_windows
from tests.test_eval_common import BOS, CORPUS, continuation_logprob, make_hf_dir, token_logprobs

REPO = Path(__file__).resolve().parent.parent
CONTEXT = "Question: What color is the sky? Answer:"
POOL = [" blue", " four", " the dog sleeps", " Paris", " a", " 12", " forest and sea", " x y z", " Rome is big",
        " def", " capital of France", " 6789"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("evalhf")
    hf = make_hf_dir(directory / "hf", seed=1)
    rt = runtime.load(directory / "hf", mesh_shape=(1, 1, 1))
    return directory, hf, rt


def oracle_pair(tok: Tokenizer, context: str, continuation: str):
    """lm-eval's causal split, written out again over the raw `tokenizers` library, bos first."""
    bos = tok.token_to_id(BOS)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = [bos] + tok.encode(context, add_special_tokens=False).ids
    whole = [bos] + tok.encode(context + continuation, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


def oracle_scores(hf, tok, context, choices, uncond="Answer:"):
    rows = []
    for choice in choices:
        c, t = oracle_pair(tok, context, choice)
        u, tu = oracle_pair(tok, uncond, choice)
        lp = continuation_logprob(hf, c + t, len(t))[0]
        rows.append((lp, len(t), len(choice), lp - continuation_logprob(hf, u + tu, len(tu))[0]))
    rows = np.array(rows)
    return rows, {"acc": rows[:, 0], "acc_norm": rows[:, 0] / rows[:, 2], "acc_token_norm": rows[:, 0] / rows[:, 1],
                  "acc_uncond": rows[:, 3]}


def test_each_normalization_picks_its_own_answer(setup):
    directory, hf, rt = setup
    tok = Tokenizer.from_file(str(rt.tokenizer.path))
    # Choose four choices on which the four scores (by transformers) pick four different answers.
    _, pool_scores = oracle_scores(hf, tok, CONTEXT, POOL)
    for subset in itertools.combinations(range(len(POOL)), 4):
        picks = [int(np.argmax(pool_scores[m][list(subset)])) for m in multiple_choice.METRICS]
        if len(set(picks)) == 4:
            break
    else:
        pytest.fail("no four choices separate the normalizations under this random model")
    choices = [POOL[i] for i in subset]
    # The answer is metric m's pick in m+1 examples, so the accuracies are 0.1, 0.2, 0.3, 0.4 and a swap shows.
    rows = [{"context": CONTEXT, "choices": choices, "answer": picks[m]} for m in range(4) for _ in range(m + 1)]
    path = directory / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, skipped = multiple_choice.read_examples(path)
    scorer = scoring.Scorer(rt.model, rt.mesh, rt.rules, batch_size=4)
    metrics, details = multiple_choice.evaluate(scorer, rt.tokenizer, examples)
    assert skipped == {}
    for m, metric in enumerate(multiple_choice.METRICS):
        assert metrics[metric] == pytest.approx((m + 1) / 10), metric
    expected, _ = oracle_scores(hf, tok, CONTEXT, choices)
    np.testing.assert_allclose(details[0]["logprob"], expected[:, 0], atol=1e-4, rtol=0)
    assert details[0]["tokens"] == expected[:, 1].astype(int).tolist()


def test_trailing_space_moves_into_the_continuation(setup):
    _, _, rt = setup
    a = multiple_choice.encode_pair(rt.tokenizer, "The capital of France is ", "Paris")
    b = multiple_choice.encode_pair(rt.tokenizer, "The capital of France is", " Paris")
    assert a == b and a[0][0] == rt.tokenizer.bos_id and a[1]


def test_bits_per_byte_of_a_prepared_split_equals_transformers(setup, tmp_path):
    from dsjax.data import prepare

    directory, hf, rt = setup
    texts = [f"Question {i}: what is {i} + {i}? Answer: {2 * i}." for i in range(30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "prepared"
    manifest = prepare.prepare([str(tmp_path / "docs.jsonl")], directory / "hf" / "tokenizer.json", out,
                               val_fraction=0.5, progress=False, workers=1)
    val = [t for t in texts if prepare.held_out(prepare.text_hash(t), 0.5)]
    assert len(val) == manifest["splits"]["val"]["documents"] > 0
    # The oracle: every stored token after bos (eos included, as training evaluates), scored by transformers.
    nll = 0.0
    for text in val:
        ids = [rt.tokenizer.bos_id] + rt.tokenizer.encode(text) + [rt.tokenizer.eos_id]
        nll -= token_logprobs(hf, ids).sum()
    scorer = scoring.Scorer(rt.model, rt.mesh, rt.rules, batch_size=4)
    result = tasks.run_task(tasks.parse_spec(f"bpb:{out}"), scorer, rt.tokenizer)
    n_bytes = sum(len(t.encode()) for t in val)
    assert result["metrics"]["bytes"] == n_bytes and result["metrics"]["documents"] == len(val)
    assert result["metrics"]["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


@pytest.mark.parametrize("stride", [None, 8])
def test_bits_per_byte_equals_transformers_nll_over_the_windows(setup, stride):
    directory, hf, rt = setup
    texts = ["The quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs away. " * 3,
             "def add(a, b):\n    return a + b\n", "Paris."]
    window = 24
    nll, tokens = 0.0, 0
    for text in texts:
        ids = [rt.tokenizer.bos_id] + rt.tokenizer.encode(text)
        # The windows by their definition: each ends `stride` targets past the last (the first: a full window), holds
        # up to `window` tokens of input, and scores the targets new since the previous window.
        step, ends, end = stride or window, [], min(window, len(ids) - 1)
        while not ends or ends[-1] < len(ids) - 1:
            ends.append(end)
            end = min(end + step, len(ids) - 1)
        expected = [(ids[max(0, e - window):e + 1], e - p) for e, p in zip(ends, [0] + ends[:-1])]
        got = rolling_windows(ids, window, stride)
        assert [(list(a), n) for a, n in got] == [(list(a), n) for a, n in expected]
        scored = set()
        for e, (seq, n) in zip(ends, got):
            nll -= token_logprobs(hf, list(seq))[-n:].sum()
            tokens += n
            assert not set(range(e - n + 1, e + 1)) & scored
            scored |= set(range(e - n + 1, e + 1))
        assert scored == set(range(1, len(ids)))
    scorer = scoring.Scorer(rt.model, rt.mesh, rt.rules, batch_size=4)
    got = bpb.bits_per_byte(scorer, rt.tokenizer, texts, window=window, stride=stride)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert got["tokens"] == tokens and got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert got["nats_per_token"] == pytest.approx(nll / tokens, rel=1e-5)


def test_windows_are_lm_evals_rolling_windows():
    utils = pytest.importorskip("lm_eval.utils")
    for n, window in itertools.product([1, 2, 5, 10, 17], [1, 3, 4, 16]):
        tokens = list(range(100, 100 + n))
        theirs = [(list(c) + list(p), len(p)) for c, p in map(
            utils.make_disjoint_window, utils.get_rolling_token_windows(tokens, 7, window, 1))]
        assert [(list(s), k) for s, k in rolling_windows([7] + tokens, window)] == theirs


def test_scores_agree_across_meshes_and_compile_once_per_bucket(setup):
    _, hf, rt = setup
    rng = np.random.RandomState(0)
    seqs = [list(rng.randint(0, 300, n)) for n in (3, 9, 20, 40, 65, 80, 2, 33)]
    n_scored = [2, 4, 10, 30, 20, 5, 1, 32]
    expected = [continuation_logprob(hf, s[-65:], n) for s, n in zip(seqs, n_scored)]
    for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2)]:
        here = runtime.load(rt.checkpoint, mesh_shape=shape)
        scorer = scoring.Scorer(here.model, here.mesh, here.rules, batch_size=2, min_row=16)
        got = scorer.score(seqs, n_scored)
        np.testing.assert_allclose([g.logprob for g in got], [e[0] for e in expected], atol=1e-4, rtol=0)
        assert [g.is_greedy for g in got] == [e[1] for e in expected]
        assert [g.tokens for g in got] == n_scored
    # Packing: every row within its bucket; the same bucket twice reuses the one compiled program.
    lengths = [5, 9, 3, 16, 1, 7]
    rows = packing.pack([(0, [n]) for n in lengths], 16)
    assert sorted(g for r in rows for g, _ in r) == list(range(6))
    assert all(sum(lengths[g] for g, _ in r) <= 16 for r in rows) and len(rows) == 3
    scorer = scoring.Scorer(rt.model, rt.mesh, rt.rules, batch_size=2, min_row=16)
    forward = scorer._forward
    scorer.score([list(range(1, 30))], [5])
    before = forward._cache_size()
    scorer.score([list(range(2, 29)), list(range(3, 20)), [5, 6]], [3, 4, 1])  # longest input 26: bucket 32 too
    assert forward._cache_size() == before



def test_shared_contexts_score_as_each_sequence_alone(setup):
    """Choices laid out after one copy of their context (branch_ids) score as transformers scores each sequence
    whole, on one device and on a mesh: choices of different token lengths, a greedy one, a context ending in spaces,
    a context cut from the left (longer than the 64-token model), the same unconditional sequence twice."""
    import torch

    _, hf, rt = setup
    tok = rt.tokenizer
    context = "Question: What color is the sky? Answer:"
    long = " ".join(CORPUS).replace("\n", " ")[:300]
    questions = [(context, [" blue", " the dog sleeps", " capital of France"]),
                 ("The capital of France is  ", ["Paris", "Rome is big", " a"]),
                 (long, [" blue", " four", " the dog sleeps"]), ("Answer:", [" blue", " four"])]
    pairs = [multiple_choice.encode_pair(tok, c, x) for c, choices in questions for x in choices]
    pairs.append(pairs[-2])
    ids = pairs[0][0]
    for _ in range(2):  # the two tokens transformers' greedy decoding emits after the first context
        with torch.no_grad():
            ids = ids + [int(hf(torch.tensor([ids])).logits[0, -1].argmax())]
    pairs.insert(0, (pairs[0][0], ids[len(pairs[0][0]):]))
    seqs, n_scored = [c + x for c, x in pairs], [len(x) for _, x in pairs]
    assert len(set(n_scored[:4])) >= 3 and len(seqs[8]) > rt.max_len + 1
    expected = [continuation_logprob(hf, s[-(rt.max_len + 1):], n) for s, n in zip(seqs, n_scored)]
    assert any(g for _, g in expected) and not all(g for _, g in expected)
    cut = [(np.asarray(s[-(rt.max_len + 1):], np.int32), n) for s, n in zip(seqs, n_scored)]
    grouped = packing.group(cut)
    # One group per context (the long one: one per choice length, as each is cut differently), the repeat laid out once.
    sizes = {len(b) for b in grouped.branches}
    assert len(grouped.unique) == len(seqs) - 1 and len(grouped.prefixes) < len(grouped.unique) and 4 in sizes
    for shape, share in [((1, 1, 1), False), ((1, 1, 1), True), ((2, 2, 2), True)]:
        here = rt if shape == (1, 1, 1) else runtime.load(rt.checkpoint, mesh_shape=shape)
        scorer = scoring.Scorer(here.model, here.mesh, here.rules, batch_size=2, min_row=16, share_prefixes=share)
        got = scorer.score(seqs, n_scored)
        np.testing.assert_allclose([g.logprob for g in got], [e[0] for e in expected], atol=1e-4, rtol=0)
        assert [g.is_greedy for g in got] == [e[1] for e in expected]
        assert [g.tokens for g in got] == n_scored


def test_packing_splits_a_group_too_long_for_a_row():
    groups = [(8, [4, 4, 4]), (2, [3] * 8), (0, [5]), (6, [1, 2])]
    rows = packing.pack(groups, 16)
    laid = sorted((g, b) for r in rows for g, members in r for b in members)
    assert laid == sorted((g, b) for g, (_, lengths) in enumerate(groups) for b in range(len(lengths)))
    assert all(sum(groups[g][0] + sum(groups[g][1][b] for b in m) for g, m in r) <= 16 for r in rows)
    # Groups 0 (8 + 3 x 4) and 1 (2 + 8 x 3) take two rows each, prefix repeated: 70 tokens in the fewest rows.
    assert [sum(g == k for r in rows for g, _ in r) for k in range(4)] == [2, 2, 1, 1] and len(rows) == 5


def test_branch_ids_need_the_xla_backend():
    from dsjax.errors import ConfigError
    from dsjax.model.attention_ops import dot_product_attention

    q = np.zeros((1, 4, 2, 8), np.float32)
    ids = np.ones((1, 4), np.int32)
    assert dot_product_attention(q, q, q, ids, ids).shape == q.shape
    with pytest.raises(ConfigError, match="model.attention='xla'"):
        dot_product_attention(q, q, q, ids, ids, backend="pallas")

def run_cli(argv, capsys):
    try:
        report = cli.main(argv)
        code = 0
    except SystemExit as e:
        report, code = None, e.code
    out = capsys.readouterr()
    return code, report, out.out, out.err


def test_cli_runs_several_tasks_and_writes_results(setup, capsys):
    directory, _, rt = setup
    (directory / "docs").mkdir(exist_ok=True)
    (directory / "docs" / "a.txt").write_text("The capital of Italy is Rome. " * 4)
    (directory / "docs" / "b.jsonl").write_text(json.dumps({"text": "Water boils at one hundred degrees."}) + "\n"
                                                + "{not json\n")
    mc = directory / "cli_mc.jsonl"
    mc.write_text(json.dumps({"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0})
                  + "\n" + '{"context": "x", "choices": "abc", "answer": 0}\n')
    output = directory / "results.json"
    code, report, out, err = run_cli([f"--checkpoint={rt.checkpoint}", f"--task=bpb:{directory / 'docs'}",
                                      f"--task=mc:{mc}", f"--output={output}", "--no_progress"], capsys)
    assert code == 0, err
    saved = json.loads(output.read_text())
    assert saved["checkpoint"] == str(Path(rt.checkpoint).absolute()) and saved["date"]
    bpb_result, mc_result = saved["tasks"]
    assert bpb_result["metrics"]["documents"] == 2 and bpb_result["skipped"] == {"invalid_json": 1}
    assert mc_result["metrics"]["examples"] == 1 and mc_result["skipped"] == {"malformed": 1}
    assert f"{mc}:2" in err and "bits_per_byte" in out and "acc_uncond" in out


@pytest.mark.parametrize("row, expected", [
    ({"context": "a", "choices": [" b", " c"], "answer": 2}, "'answer' is 2 but there are 2 choices"),
    ({"context": "a", "choices": [], "answer": 0}, "'choices' is empty"),
])
def test_cli_refuses_bad_rows_in_one_sentence(setup, capsys, row, expected):
    directory, _, rt = setup
    path = directory / "bad.jsonl"
    path.write_text(json.dumps({"context": "a", "choices": [" b"], "answer": 0}) + "\n" + json.dumps(row) + "\n")
    code, _, _, err = run_cli([f"--checkpoint={rt.checkpoint}", f"--task=mc:{path}", "--no_progress"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {path}:2: {expected}") and "Traceback" not in err


def test_cli_refuses_unknown_kind_and_non_checkpoint(setup, capsys, tmp_path):
    _, _, rt = setup
    code, _, _, err = run_cli([f"--checkpoint={rt.checkpoint}", "--task=ppl:x.txt"], capsys)
    assert code == 2 and err.strip() == "error: --task=ppl:x.txt: unknown task kind 'ppl'; use one of bpb, mc, gen (as KIND:FILE)."
    code, _, _, err = run_cli([f"--checkpoint={tmp_path}", "--task=mc:x.jsonl"], capsys)
    assert code == 2 and err.strip().startswith(f"error: --checkpoint={tmp_path} is neither a dsjax checkpoint")
    assert len(err.strip().splitlines()) == 1


def test_eval_imports_no_trainer_code():
    code = ("import sys, dsjax.eval, dsjax.eval.__main__, dsjax.eval.tasks; "
            "bad = [m for m in sys.modules if m.startswith('dsjax.train')]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in (REPO / "dsjax" / "eval").glob("*.py"):
        assert "dsjax.train" not in path.read_text(), path


def test_generation_task_matches_transformers_greedy_text(setup, capsys):
    directory, hf, rt = setup
    import torch

    prompts = ["The capital of France is", "Question: How many legs has a cat? Answer:", "def add(a, b):"]
    completions = []
    for prompt in prompts:
        ids = [rt.tokenizer.bos_id] + rt.tokenizer.encode(prompt)
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, eos_token_id=rt.tokenizer.eos_id,
                          pad_token_id=rt.tokenizer.eos_id)[0, len(ids):].tolist()
        if rt.tokenizer.eos_id in out:
            out = out[:out.index(rt.tokenizer.eos_id)]
        completions.append(rt.tokenizer.decode(out).split("\n")[0])
    # Rows 0 and 2 carry transformers' own completion as the answer, row 1 a wrong one.
    answers = [completions[0], completions[1] + " and more", completions[2]]
    path = directory / "gen.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    output = directory / "gen_results.json"
    code, _, _, err = run_cli([f"--checkpoint={rt.checkpoint}", f"--task=gen:{path}", "--max_new_tokens=8",
                               "--stop=\n", f"--output={output}", "--details", "--no_progress"], capsys)
    assert code == 0, err
    result = json.loads(output.read_text())["tasks"][0]
    assert [d["completion"] for d in result["details"]] == completions
    assert result["metrics"] == {"exact_match": pytest.approx(2 / 3), "examples": 3}


def test_last_number_extractor_reads_gsm8k_answers():
    from dsjax.eval.generation import extract

    assert extract("Natalia sold 48 + 24 = 72 clips.\n#### 72", "last_number") == "72"
    assert extract("so the answer is 1,250.0 dollars", "last_number") == "1250"
    assert extract("-3 degrees", "last_number") == "-3"
    assert extract("no digits here", "last_number") is None
    assert extract("  Paris \n", "exact") == "Paris"
