"""Evaluation: bits-per-byte, multiple choice scored as the paper does, generation tasks, an lm-eval model.

CLI: `python -m dsjax.eval --checkpoint=PATH --task=bpb:FILES --task=mc:FILE.jsonl`. In Python:

    rt = runtime.load(PATH)                                   # model on a mesh + tokenizer
    scorer = Scorer(rt.model, rt.mesh, rt.rules)
    bpb.bits_per_byte(scorer, rt.tokenizer, texts)            # {'bits_per_byte': ..., 'nats_per_token': ...}
    multiple_choice.evaluate(scorer, rt.tokenizer, examples)  # ({'acc': ..., 'acc_norm': ...}, details)

Nothing here imports the trainer; `dsjax.eval.harness` (lm-evaluation-harness) is imported only when asked for.
"""

from dsjax.eval import bpb, multiple_choice, runtime, tasks, windows
from dsjax.eval.scoring import Scorer, Scored

__all__ = ["Scorer", "Scored", "bpb", "multiple_choice", "runtime", "tasks", "windows"]
