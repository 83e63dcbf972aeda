"""python -m dsjax.chat --checkpoint=PATH: multi-turn chat in the DeepSeek chat template, replies streamed.

Type a message and press enter; `/reset` forgets the conversation, `/exit` (or end of input) quits. Works with piped
stdin too (`printf 'Hi\\n/exit\\n' | python -m dsjax.chat ...`): then no prompt is shown, only the replies, one per
line. When the history outgrows the context, the oldest turns are dropped (a note on stderr says so). PATH is a
dsjax checkpoint directory, a training workdir, or a Hugging Face model directory such as deepseek-llm-7b-chat;
without --checkpoint, the furthest run of the offline walkthrough (runs/tiny_dpo, runs/tiny_sft, runs/tiny).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dsjax.generate import cli
from dsjax.generate.chat import chat_prompt_ids, stream_reply


def fit_history(generator, messages, system, max_new_tokens):
    """Drops the oldest turns (keeping the system message) until the prompt leaves room for the reply."""
    room = generator.config.max_seq_len - max_new_tokens
    dropped = False
    while len(messages) > 1 and len(chat_prompt_ids(generator.tokenizer, system + messages)) > room:
        messages = messages[2:] if len(messages) > 2 else messages[1:]
        dropped = True
    if dropped:
        print("(the oldest turns no longer fit the context and were dropped)", file=sys.stderr)
    return messages


# The offline walkthrough's runs, newest stage first: with no --checkpoint, chat with the furthest one reached.
WALKTHROUGH = ("runs/tiny_dpo", "runs/tiny_sft", "runs/tiny")


def default_checkpoint() -> str | None:
    return next((run for run in WALKTHROUGH if Path(run, "checkpoints").is_dir()), None)


def main(argv=None) -> None:
    parser = cli.Parser(prog="python -m dsjax.chat", description=__doc__.split("\n\n")[0])
    cli.add_model_flags(parser, default_checkpoint())
    parser.add_argument("--system", default="", help="a system message (DeepSeek advises none)")
    cli.add_sampling_flags(parser, max_new_tokens=None)
    parser.set_defaults(truncate="left")
    args = parser.parse_args(argv)
    sampling = cli.sampling_params(args)
    generator, context = cli.load(args)
    if args.max_new_tokens is None:  # a long reply, but room for the conversation in a small model's context too
        args.max_new_tokens = min(512, generator.config.max_seq_len // 2)
    generator.check_lengths([[0]], args.max_new_tokens)  # max_new_tokens against the context, before any input
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = []
    with context:
        while True:
            if interactive:
                print("User: ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return
            text = line.rstrip("\n")
            if text.strip() == "/reset":
                messages = []
                print("(conversation reset)", file=sys.stderr)
                continue
            if not text.strip():
                continue
            messages = fit_history(generator, messages + [{"role": "user", "content": text}], system,
                                   args.max_new_tokens)
            if interactive:
                print("Assistant:", end="", flush=True)
            reply = ""
            for piece in stream_reply(generator, system + messages, max_new_tokens=args.max_new_tokens,
                                      sampling=sampling, stop=args.stop, seed=args.seed, truncate=args.truncate):
                reply += piece
                print(piece, end="", flush=True)
            print(flush=True)
            # The template adds the space after "Assistant:"; the model's reply usually starts with it.
            messages.append({"role": "assistant", "content": reply[1:] if reply.startswith(" ") else reply})


if __name__ == "__main__":
    cli.run(main)
