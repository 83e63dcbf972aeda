"""Multiple-choice throughput: dsjax.eval vs lm-evaluation-harness's `hf` model, same task, same weights, this CPU.

    python experiments/bench_eval.py [--examples 256] [--layers 4] [--d_model 256]

A random LlamaForCausalLM (saved as safetensors with a byte-level BPE tokenizer.json) answers synthetic 4-choice
questions of 40-word contexts (~150 tokens of this 300-token vocabulary, choices 1-37 tokens). Timed, after one
warm-up pass each (compilation excluded, as it is paid once):
- dsjax.eval multiple choice (all four scores: it also scores every choice after the unconditional context,
  i.e. twice the sequences lm-eval's acc/acc_norm need; each context runs once for its four choices);
- lm-eval's `hf` model and our `dsjax` lm-eval model on the same `loglikelihood` requests (context, " choice"):
  `hf` runs each context once per choice, ours once per context.
One run, the three one after another in one process; prints examples/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from tests.test_eval_common import CORPUS  # noqa: E402

WORDS = " ".join(CORPUS).replace("\n", " ").split()


def make_examples(n: int, seed: int = 0):
    from dsjax.eval.multiple_choice import Example

    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        context = " ".join(rng.choice(WORDS, 40)) + " Answer:"
        choices = tuple(" " + " ".join(rng.choice(WORDS, rng.randint(1, 6))) for _ in range(4))
        out.append(Example(context, choices, int(rng.randint(4)), "Answer:", f"synthetic:{i + 1}"))
    return out


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsjax.eval import multiple_choice, runtime
    from dsjax.eval.harness import DsjaxLM
    from dsjax.eval.scoring import Scorer
    from tests.test_eval_common import make_hf_dir

    directory = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    make_hf_dir(directory, max_len=256)  # writes the tokenizer; the model is replaced by a larger one below
    small = LlamaForCausalLM.from_pretrained(directory)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=small.config.vocab_size, hidden_size=args.d_model, intermediate_size=args.d_model * 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.d_model // 64, head_dim=64,
                      num_key_value_heads=args.d_model // 64, max_position_embeddings=256, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, bos_token_id=small.config.bos_token_id,
                      eos_token_id=small.config.eos_token_id)
    LlamaForCausalLM(cfg).eval().save_pretrained(directory, safe_serialization=True)

    examples = make_examples(args.examples)
    requests = [Instance("loglikelihood", {}, (e.context, c), i) for e in examples for i, c in enumerate(e.choices)]

    rt = runtime.load(directory, mesh_shape=(1, 1, 1))
    scorer = Scorer(rt.model, rt.mesh, rt.rules, batch_size=args.batch_size)
    multiple_choice.evaluate(scorer, rt.tokenizer, examples[:32])  # warm-up: compiles the buckets
    t_dsjax = timed(lambda: multiple_choice.evaluate(scorer, rt.tokenizer, examples))

    ours = DsjaxLM(checkpoint=str(directory), batch_size=args.batch_size)
    ours.loglikelihood(requests[:64], disable_tqdm=True)
    t_ours = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))

    hf = HFLM(pretrained=str(directory), batch_size=args.batch_size, device="cpu", dtype="float32")
    hf.loglikelihood(requests[:64], disable_tqdm=True)
    t_hf = timed(lambda: hf.loglikelihood(requests, disable_tqdm=True))

    n = len(examples)
    print(f"model: {args.layers} layers, d_model {args.d_model}, vocab {cfg.vocab_size}; {n} examples x 4 choices; "
          f"torch threads {torch.get_num_threads()}")
    print(f"dsjax.eval mc (acc, acc_norm, acc_token_norm, acc_uncond): {n / t_dsjax:8.1f} examples/s")
    print(f"lm-eval + dsjax model (loglikelihood only):                 {n / t_ours:8.1f} examples/s")
    print(f"lm-eval + hf model    (loglikelihood only):                 {n / t_hf:8.1f} examples/s")
    print(f"ratio dsjax.eval / hf: {t_hf / t_dsjax:.2f}x; lm-eval dsjax / hf: {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
