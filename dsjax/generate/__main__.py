"""python -m dsjax.generate --checkpoint=PATH --prompt="..." [--prompts_file=F.jsonl] [sampling flags] [--output=F]

Completes each prompt (bos prepended) with the KV-cache decoder; `--temperature=0`, the default, is greedy. Prompts
come from repeated --prompt flags and/or --prompts_file (.jsonl rows with a "prompt" field, or any other file with
one prompt per line). Prints each completion, or with --output writes one JSON row per prompt: prompt, completion,
completion_ids, finish_reason (eos, stop or length). PATH is a dsjax checkpoint directory, a training workdir (its
newest checkpoint) or a Hugging Face model directory (safetensors + tokenizer.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dsjax.errors import ConfigError, DataError
from dsjax.generate import cli


def read_prompts(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"--prompts_file={path} does not exist.")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix != ".jsonl":
        return [line for line in lines if line]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number} is not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(f"{path} line {number} has no string field \"prompt\".")
        prompts.append(row["prompt"])
    return prompts


def main(argv=None) -> None:
    parser = cli.Parser(prog="python -m dsjax.generate", description=__doc__.split("\n\n")[1])
    cli.add_model_flags(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts_file", help=".jsonl with a \"prompt\" field per row, or one prompt per line")
    parser.add_argument("--output", help="write results as JSON lines here instead of printing them")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts decoded together")
    cli.add_sampling_flags(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompts_file.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size={args.batch_size} must be positive.")
    sampling = cli.sampling_params(args)
    generator, context = cli.load(args)
    # Every prompt is checked before the first is decoded, so an error names its index in the whole list.
    prompt_ids = generator.check_lengths(generator.encode(prompts), args.max_new_tokens, args.truncate)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        with context:
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start : start + args.batch_size]
                result = generator.generate(
                    prompt_ids[start : start + args.batch_size], max_new_tokens=args.max_new_tokens,
                    temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                    min_p=sampling.min_p, repetition_penalty=sampling.repetition_penalty, stop=args.stop,
                    seed=args.seed,
                )
                for prompt, completion in zip(batch, result):
                    if out is not None:
                        row = dict(prompt=prompt, completion=completion.text, completion_ids=completion.ids,
                                   finish_reason=completion.finish_reason)
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    else:
                        print(f"{prompt}\033[1m{completion.text}\033[0m" if sys.stdout.isatty()
                              else prompt + completion.text)
                        print()
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    cli.run(main)
