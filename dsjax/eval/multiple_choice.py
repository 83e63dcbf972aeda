"""Multiple choice scored by likelihood, the paper's way and lm-evaluation-harness's, from one set of forward passes.

Rows of a JSONL file: `{"context": str, "choices": [str, ...], "answer": int}` and optionally
`"unconditional_context"` (default "Answer:"). Each choice is appended to the context as it is (put the space
before it in either), tokenized as lm-eval does: the whole string encoded, the choice's tokens being what follows
the context's tokens, trailing spaces of the context moved into the choice first; bos comes first, as in training.
The scorer runs each context once for all its choices, and the unconditional context once for every choice text
(`packing.py`).

Scores per choice, the best one wins:
- acc:            log p(choice | context)
- acc_norm:       the same divided by the choice's characters (lm-eval's acc_norm)
- acc_token_norm: the same divided by the choice's tokens (lowest perplexity: the paper's length normalization)
- acc_uncond:     log p(choice | context) - log p(choice | unconditional context) (the paper's for ARC, OpenBookQA)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsjax.errors import DataError
from dsjax.eval.rows import read_rows
from dsjax.eval.scoring import Scorer

DEFAULT_UNCONDITIONAL = "Answer:"
METRICS = ("acc", "acc_norm", "acc_token_norm", "acc_uncond")


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    answer: int
    unconditional_context: str
    location: str  # file:line


def read_examples(path, stream=None) -> tuple[list[Example], dict]:
    """The examples of a JSONL file and the count of malformed rows skipped (their first locations printed).

    A row that cannot be a question (not JSON, a field missing or of the wrong type) is skipped and counted; one
    that is well formed but wrong (no choices, an answer out of range) stops the run, naming file:line.
    """
    return read_rows(path, "mc", _parse, stream)


def _parse(row: dict, location: str):
    problem = _malformed(row)
    if problem:
        return problem
    if not row["choices"]:
        raise DataError(f"{location}: 'choices' is empty; a multiple-choice row needs at least one choice.")
    answer = row["answer"]
    if not 0 <= answer < len(row["choices"]):
        raise DataError(f"{location}: 'answer' is {answer} but there are {len(row['choices'])} choices (0-based index).")
    return Example(row["context"], tuple(row["choices"]), answer,
                   row.get("unconditional_context", DEFAULT_UNCONDITIONAL), location)


def _malformed(row) -> str | None:
    if not isinstance(row, dict):
        return "a row must be a JSON object"
    if not isinstance(row.get("context"), str):
        return "no string field 'context'"
    choices = row.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        return "'choices' is not a list of strings"
    if not isinstance(row.get("answer"), int) or isinstance(row.get("answer"), bool):
        return "'answer' is not an integer"
    if not isinstance(row.get("unconditional_context", ""), str):
        return "'unconditional_context' is not a string"
    return None


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with bos, continuation ids) split the way lm-evaluation-harness's causal models split them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = [tokenizer.bos_id] + tokenizer.encode(context)
    whole = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
    return context_ids, whole[len(context_ids):]


def evaluate(scorer: Scorer, tokenizer, examples: list[Example], progress=None) -> tuple[dict, list[dict]]:
    """Accuracy under each normalization, and per example every choice's scores (for the results file)."""
    sequences, n_scored, owners = [], [], []
    for e, ex in enumerate(examples):
        for c, choice in enumerate(ex.choices):
            for kind, ctx in (("cond", ex.context), ("uncond", ex.unconditional_context)):
                context_ids, choice_ids = encode_pair(tokenizer, ctx, choice)
                if not choice_ids:
                    raise DataError(f"{ex.location}: choice {c} ({choice!r}) adds no token to the context.")
                sequences.append(context_ids + choice_ids)
                n_scored.append(len(choice_ids))
                owners.append((e, c, kind))
    scored = scorer.score(sequences, n_scored, progress)
    logprob = {key: s for key, s in zip(owners, scored)}
    correct = {m: 0 for m in METRICS}
    details = []
    for e, ex in enumerate(examples):
        cond = np.array([logprob[(e, c, "cond")].logprob for c in range(len(ex.choices))])
        tokens = np.array([logprob[(e, c, "cond")].tokens for c in range(len(ex.choices))])
        uncond = np.array([logprob[(e, c, "uncond")].logprob for c in range(len(ex.choices))])
        chars = np.array([max(len(choice), 1) for choice in ex.choices])
        scores = {"acc": cond, "acc_norm": cond / chars, "acc_token_norm": cond / tokens, "acc_uncond": cond - uncond}
        picks = {m: int(np.argmax(v)) for m, v in scores.items()}
        for m in METRICS:
            correct[m] += picks[m] == ex.answer
        details.append({"location": ex.location, "answer": ex.answer, "picked": picks,
                        "logprob": cond.tolist(), "tokens": tokens.tolist(), "uncond_logprob": uncond.tolist()})
    n = len(examples)
    metrics = {m: correct[m] / n for m in METRICS}
    metrics["examples"] = n
    return metrics, details
