"""`python -m dsjax.generate` and `python -m dsjax.chat`: outputs, piped chat, one-sentence errors for bad input."""

import io
import json
import re
import subprocess
import sys

import pytest

from dsjax import checkpoint
from dsjax.chat import main as chat_main
from dsjax.generate import generate
from dsjax.generate import cli
from dsjax.generate.__main__ import main as generate_main
from dsjax.generate.chat import chat, chat_prompt_ids
from dsjax.interop.hf import load_model
from dsjax.data.tokenizer import load_tokenizer
from tests.test_generate import CONTEXT, REPO, make_hf_dir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("cli") / "hf")


def run_cli(main, argv, capsys):
    """Runs a CLI in-process through the same error handling as `python -m`; (exit code, stdout, stderr)."""
    try:
        cli.run(main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_jsonl_like_the_api(hf_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def greet("}) + "\n" + json.dumps({"prompt": "class P"}) + "\n")
    output = tmp_path / "out.jsonl"
    code, _, err = run_cli(generate_main, [f"--checkpoint={hf_dir}", "--prompt=for i in", f"--prompts_file={prompts}",
                                           "--max_new_tokens=12", f"--output={output}"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["for i in", "def greet(", "class P"]
    expected = generate(load_model(hf_dir), load_tokenizer(hf_dir / "tokenizer.json"), [r["prompt"] for r in rows],
                        max_new_tokens=12)
    assert [r["completion"] for r in rows] == expected.texts
    assert [r["completion_ids"] for r in rows] == expected.ids
    assert all(r["finish_reason"] in ("eos", "length") for r in rows)


def test_a_dsjax_checkpoint_works_too(hf_dir, tmp_path, capsys):
    model = load_model(hf_dir)
    root = tmp_path / "ck"
    checkpoint.save_params(model, root)
    (root / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    code, out, err = run_cli(generate_main, [f"--checkpoint={root}", "--prompt=def ", "--max_new_tokens=5"], capsys)
    assert code == 0, err
    expected = generate(model, load_tokenizer(hf_dir / "tokenizer.json"), ["def "], max_new_tokens=5).texts[0]
    assert out.startswith("def " + expected)


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_sentence(hf_dir, tmp_path, capsys):
    long_prompt = "x = 1\n" * 40  # far more tokens than the 64-token context leaves
    cases = [
        ([f"--checkpoint={tmp_path}", "--prompt=a"], str(tmp_path)),
        ([f"--checkpoint={tmp_path / 'missing'}", "--prompt=a"], "does not exist"),
        ([f"--checkpoint={hf_dir}", f"--prompt={long_prompt}", "--max_new_tokens=8"],
         "prompt 0 is .* tokens, more than the 56 that the model's context of 64"),
        ([f"--checkpoint={hf_dir}", "--prompt=a", "--max_new_tokens=100"],
         "max_new_tokens=100 is beyond the model's context of 64"),
        ([f"--checkpoint={hf_dir}", "--prompt=a", "--truncate=right"], "--truncate: invalid choice: 'right'"),
        ([f"--checkpoint={hf_dir}", "--prompt=a", "--top_p=1.5"], r"top_p=1.5 must be in \(0, 1\]"),
        ([f"--checkpoint={hf_dir}"], "give at least one --prompt"),
    ]
    for argv, pattern in cases:
        code, _, err = run_cli(generate_main, argv, capsys)
        assert code == 2 and re.search(pattern, one_error_line(err)), (argv, err)
    # --truncate=left keeps the end of the prompt instead.
    code, out, err = run_cli(generate_main, [f"--checkpoint={hf_dir}", f"--prompt={long_prompt}",
                                             "--max_new_tokens=8", "--truncate=left"], capsys)
    assert code == 0 and out.startswith(long_prompt), err


def test_no_traceback_from_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dsjax.generate", f"--checkpoint={tmp_path}", "--prompt=a"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "dsjax checkpoint" in one_error_line(done.stderr)


def test_chat_with_piped_stdin(hf_dir, capsys, monkeypatch):
    stdin = "Hello there\nHow are you?\n/reset\nHello there\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a tty: replies only, as from a pipe
    code, out, err = run_cli(chat_main, [f"--checkpoint={hf_dir}", "--max_new_tokens=10"], capsys)
    assert code == 0, err
    model, tokenizer = load_model(hf_dir), load_tokenizer(hf_dir / "tokenizer.json")
    first = chat(model, tokenizer, [{"role": "user", "content": "Hello there"}], max_new_tokens=10)
    history = [{"role": "user", "content": "Hello there"},
               {"role": "assistant", "content": first[1:] if first.startswith(" ") else first},
               {"role": "user", "content": "How are you?"}]
    # The history is kept, except turns that no longer fit the 64-token context beside the reply.
    if len(chat_prompt_ids(tokenizer, history)) > CONTEXT - 10:
        history = history[2:]
        assert "oldest turns" in err
    second = chat(model, tokenizer, history, max_new_tokens=10)
    assert second != first
    # After /reset the same first message gets the same first reply: the history was forgotten.
    assert out == f"{first}\n{second}\n{first}\n"
    assert "conversation reset" in err


def test_chat_default_reply_length_fits_a_small_context(hf_dir, capsys, monkeypatch):
    """No --max_new_tokens: at most half the context (here 32 of 64), not a 512 the model cannot hold."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/exit\n"))
    code, out, err = run_cli(chat_main, [f"--checkpoint={hf_dir}"], capsys)
    assert code == 0, err
    model, tokenizer = load_model(hf_dir), load_tokenizer(hf_dir / "tokenizer.json")
    assert out == chat(model, tokenizer, [{"role": "user", "content": "Hello there"}], max_new_tokens=CONTEXT // 2) + "\n"
