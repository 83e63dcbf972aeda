"""Generation tasks: greedy completions of prompts, an answer pulled out of each, exact-match accuracy.

Rows of a JSONL file: `{"prompt": str, "answer": str or number}`. Extractors: `exact` compares the whole completion
(whitespace-stripped) with the answer; `last_number` compares the last number in the completion with the last
number in the answer (GSM8K's "... #### 72" answers work as they are), commas and a trailing ".0" ignored. With
`chat`, each prompt is one user message in the DeepSeek chat template. Decoding is dsjax.generate's KV cache.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dsjax import sharding as shd
from dsjax.errors import ConfigError
from dsjax.eval.rows import read_rows

EXTRACTORS = ("exact", "last_number")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _parse(row: dict, location: str):
    answer = row.get("answer")
    if not isinstance(row.get("prompt"), str) or not row["prompt"]:
        return "no non-empty string field 'prompt'"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return "'answer' is not a string or a number"
    return {"prompt": row["prompt"], "answer": str(answer), "location": location}


def read_examples(path, stream=None) -> tuple[list[dict], dict]:
    """Rows with a string prompt and a string or numeric answer; other rows are skipped and counted."""
    return read_rows(path, "gen", _parse, stream)


def extract(text: str, extractor: str) -> str | None:
    """The answer a completion gives under `extractor` (None: no number in it)."""
    if extractor == "exact":
        return text.strip()
    if extractor == "last_number":
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        value = numbers[-1].replace(",", "")
        return value[:-2] if value.endswith(".0") else value
    raise ConfigError(f"extractor {extractor!r} is not one of {', '.join(EXTRACTORS)}.")


def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                   temperature: float = 0.0, add_bos: bool = True, chat: bool = False, batch_size: int = 16,
                   mesh=None, rules=shd.DEFAULT_RULES, progress=None) -> list[str]:
    """Completions of each prompt (cut before the first stop string), `batch_size` prompts per generator call.

    Prompts too long for the context beside max_new_tokens lose their oldest tokens (bos kept).
    """
    from dsjax.data import chat as chat_template
    from dsjax.generate import Generator

    generator = Generator(model, tokenizer)
    ids = []
    for prompt in prompts:
        if chat:
            ids.append(chat_template.prompt_ids(tokenizer, [{"role": "user", "content": prompt}]))
        else:
            ids.append(([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(prompt) or [tokenizer.bos_id])
    ids = generator.check_lengths(ids, max_new_tokens, truncate="left")
    texts = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        if mesh is None:
            out = generator.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop))
        else:
            with shd.use_rules(mesh, rules):
                out = generator.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                         stop=list(stop))
        texts.extend(out.texts)
        if progress:
            progress(len(batch), len(ids))
    if chat:  # the template puts a space after "Assistant:"; the answer starts after it
        texts = [t[1:] if t.startswith(" ") else t for t in texts]
    return texts


def evaluate(model, tokenizer, examples: list[dict], *, max_new_tokens: int = 256, stop: Sequence[str] | None = None,
             extractor: str = "exact", chat: bool = False, batch_size: int = 16, mesh=None, rules=shd.DEFAULT_RULES,
             progress=None) -> tuple[dict, list[dict]]:
    """Greedy completions, their extracted answers, and exact-match accuracy against each row's answer."""
    if extractor not in EXTRACTORS:
        raise ConfigError(f"--extractor={extractor} is not one of {', '.join(EXTRACTORS)}.")
    texts = generate_texts(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens=max_new_tokens,
                           stop=stop or (), chat=chat, batch_size=batch_size, mesh=mesh, rules=rules,
                           progress=progress)
    correct, details = 0, []
    for example, text in zip(examples, texts):
        got = extract(text, extractor)
        want = extract(example["answer"], extractor)
        hit = got is not None and got == want
        correct += hit
        details.append({"location": example["location"], "completion": text, "extracted": got, "answer": want,
                        "correct": hit})
    return {"exact_match": correct / len(examples), "examples": len(examples)}, details
