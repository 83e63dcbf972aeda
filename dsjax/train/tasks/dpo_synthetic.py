"""On-policy preference pairs for the offline DPO demo (`--config=tiny_dpo`, `data.datasets=synthetic`): the SFT
model's own sampled answers to the synthetic problems of dsjax/data/synthetic.py, labelled by correctness, as real
preference data is labelled by people or a reward model.

Each problem is answered `dpo.synthetic_samples` times by the SFT model (`train.init_from`) at
`dpo.synthetic_temperature`. A pair is (right, wrong) for the same prompt: rejected is the model's most frequent
wrong answer (its likeliest mistake); chosen is its most frequent right answer, or the reference answer when no
sample was right (so problems the model cannot solve yet still teach something; the share of such pairs is logged).
A problem the model answered right every time gives no pair. Train pairs come from training-side problems drawn with
a seed of their own, held-out pairs from the held-out problems the SFT demo measures exact match on, which neither
stage trains on: so held-out `rewards/accuracies` says how often the policy prefers an unseen right answer.

The pairs are prepared (as `python -m dsjax.data.prepare --format=preference` would) into the data cache under a
fingerprint of the SFT checkpoint's files, its tokenizer and these settings, and reused while those stay the same.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import time
from pathlib import Path

from dsjax import checkpoint
from dsjax.data import chat, prepare, synthetic
from dsjax.data.corpus import cache_root
from dsjax.data.tokenizer import load_tokenizer
from dsjax.errors import DataError

SAMPLE_BATCH = 512  # rows per generation call: a fixed shape, compiled once


def seed_of(config) -> int:
    return config.data.seed if config.data.seed is not None else config.seed


def held_out_examples(config, count: int) -> list[synthetic.Example]:
    """The held-out problems, in the order (and so the subset) SFT's exact match reads them."""
    return synthetic.examples("val", count, seed_of(config))


def _fingerprint(config, tok) -> str:
    from dsjax.train.tasks.dpo_reference import reference_identity

    d = config.dpo
    described = {"sft": reference_identity(config.train.init_from), "tokenizer": tok.fingerprint,
                 "seed": seed_of(config), "prompts": d.synthetic_prompts, "val_prompts": d.synthetic_val_prompts,
                 "samples": d.synthetic_samples, "temperature": float(d.synthetic_temperature),
                 "max_new_tokens": d.max_new_tokens,
                 "seq_len": config.train.seq_len, "tasks": synthetic.TASKS,
                 "generator": synthetic.fingerprint()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def sample_answers(model, tok, examples, samples: int, temperature: float, seed: int,
                   max_new_tokens: int) -> list[list[str]]:
    """`samples` sampled replies (decoded text) per example, in fixed-shape batches."""
    from dsjax.generate import Generator
    from dsjax.generate.sampling import SamplingParams

    generator = Generator(model, tok)
    rows = [chat.prompt_ids(tok, e.messages) for e in examples for _ in range(samples)]
    replies: list[str] = []
    params = SamplingParams(float(temperature), 0, 1.0, 0.0, 1.0)
    for start in range(0, len(rows), SAMPLE_BATCH):
        chunk = rows[start: start + SAMPLE_BATCH]
        padded = chunk + [chunk[-1]] * (SAMPLE_BATCH - len(chunk))
        for out, n_out, _ in generator.run(padded, max_new_tokens=max_new_tokens, sampling=params,
                                           seed=seed + start):
            pass
        replies += [chat.response_text(tok, out[r, : n_out[r]].tolist()).strip() for r in range(len(chunk))]
    return [replies[i * samples: (i + 1) * samples] for i in range(len(examples))]


def label_pairs(examples, answers: list[list[str]]) -> tuple[list[dict], dict]:
    """TRL preference rows from the sampled answers, and counts of what happened (see the module docstring)."""
    rows, stats = [], collections.Counter()
    for example, replies in zip(examples, answers):
        right = collections.Counter(a for a in replies if a == example.answer)
        wrong = collections.Counter(a for a in replies if a != example.answer and a)
        stats["samples"] += len(replies)
        stats["right_samples"] += sum(right.values())
        if not wrong:
            stats["all_right"] += 1
            continue
        chosen = right.most_common(1)[0][0] if right else example.answer
        stats["reference_chosen"] += not right
        rows.append({"prompt": example.messages, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": wrong.most_common(1)[0][0]}]})
    stats["pairs"] = len(rows)
    return rows, dict(stats)


def synthetic_pairs(config, log=print) -> Path:
    """The prepared preference dataset of the SFT model's labelled answers, built once per fingerprint."""
    init_from = config.train.init_from
    tok_file = config.data.tokenizer or checkpoint.find_tokenizer(init_from)
    if tok_file is None:
        raise DataError(f"data.datasets=synthetic needs a tokenizer: none was found with train.init_from="
                        f"{init_from}; set data.tokenizer.")
    tok = load_tokenizer(tok_file)
    out = cache_root(config) / f"dpo-synthetic-{_fingerprint(config, tok)}"
    if (out / prepare.MANIFEST).exists():
        return out
    d = config.dpo
    start = time.perf_counter()
    log(f"sampling {d.synthetic_samples} answers to {d.synthetic_prompts} training and {d.synthetic_val_prompts} "
        f"held-out problems from {init_from} (temperature {d.synthetic_temperature}) to label as preference pairs")
    model = checkpoint.load_model(init_from)
    seed = seed_of(config)
    raw = out.with_name(out.name + "-jsonl")
    raw.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, examples in (("train", synthetic.examples("train", d.synthetic_prompts, seed + 1)),
                            ("val", held_out_examples(config, d.synthetic_val_prompts))):
        answers = sample_answers(model, tok, examples, d.synthetic_samples, d.synthetic_temperature,
                                 seed=seed + (split == "val"), max_new_tokens=d.max_new_tokens)
        rows, stats = label_pairs(examples, answers)
        if not rows:
            raise DataError(f"the SFT model {init_from} answered every sampled {split} problem right: there are no "
                            "wrong answers to prefer against; raise dpo.synthetic_temperature.")
        log(f"  {split}: {stats['pairs']} pairs from {len(examples)} problems; {stats['right_samples']} of "
            f"{stats['samples']} samples right ({stats['right_samples'] / stats['samples']:.2f}); "
            f"{stats.get('reference_chosen', 0)} pairs take the reference as chosen, "
            f"{stats.get('all_right', 0)} problems were always right")
        path = raw / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths[split] = path
    prepare.prepare([str(paths["train"])], tok_file, out, format="preference", val_inputs=[str(paths["val"])],
                    max_len=config.train.seq_len, workers=1, progress=False, log=io.StringIO(), overwrite=True)
    log(f"  prepared into {out} in {time.perf_counter() - start:.1f} s")
    return out


def exact_match_prompts(config, tok) -> tuple[list[list[int]], list[str]]:
    """(prompt ids, reference answers) of the held-out problems DPO's exact match reads."""
    examples = held_out_examples(config, config.dpo.exact_match_examples)
    return [chat.prompt_ids(tok, e.messages) for e in examples], [e.answer for e in examples]

