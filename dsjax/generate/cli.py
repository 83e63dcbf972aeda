"""What `python -m dsjax.generate` and `python -m dsjax.chat` share: flags, loading a model onto a mesh, errors.

A user's mistake (a path that is no checkpoint, a prompt too long, a bad flag value) ends the command with one
`error: ...` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from dsjax import checkpoint, sharding
from dsjax.errors import CheckpointError, CheckpointNotFound, ConfigError, DataError
from dsjax.generate.generator import Generator, param_shardings
from dsjax.generate.sampling import SamplingParams

USER_ERRORS = (ConfigError, DataError, CheckpointNotFound, CheckpointError)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`, exit 2) instead of usage plus error."""

    def error(self, message):
        print(f"error: {message}.", file=sys.stderr)
        sys.exit(2)


def add_model_flags(parser: argparse.ArgumentParser, default_checkpoint: str | None = None) -> None:
    parser.add_argument("--checkpoint", required=default_checkpoint is None, default=default_checkpoint,
                        help="a dsjax checkpoint directory, a training workdir, or a Hugging Face model directory"
                        + (f" (default: {default_checkpoint})" if default_checkpoint else ""))
    parser.add_argument("--tokenizer", help="tokenizer file or directory (default: found beside the checkpoint)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "pallas"),
                        help="attention backend for the prompt (prefill)")
    parser.add_argument("--mesh", default="1,1,-1",
                        help="devices over (data, fsdp, tensor); the default puts every device on tensor")


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                        help=None if max_new_tokens else "default: 512, at most half the model's context")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 is off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 is off")
    parser.add_argument("--min_p", type=float, default=0.0, help="0 is off")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="1 is off (HF semantics)")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truncate", default="none", choices=("none", "left"),
                        help="left: drop the start of a prompt too long for the context (bos kept)")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)


def parse_mesh(text: str):
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--mesh={text!r} must be three comma-separated integers (data,fsdp,tensor).") from None
    return sharding.make_mesh(shape)


def load(args) -> tuple[Generator, contextlib.AbstractContextManager]:
    """The Generator for --checkpoint/--tokenizer, and the sharding context to run it in."""
    from dsjax.data.tokenizer import load_tokenizer
    from dsjax.model import abstract_model

    path = Path(args.checkpoint).expanduser()
    mesh = parse_mesh(args.mesh)
    tok_path = args.tokenizer or checkpoint.find_tokenizer(path)
    if not checkpoint.is_hf_dir(path):
        checkpoint.find_checkpoint(path)  # a clear CheckpointNotFound before anything else
    if tok_path is None:
        raise DataError(f"found no tokenizer beside --checkpoint={args.checkpoint}; pass --tokenizer=FILE.")
    tokenizer = load_tokenizer(tok_path)
    overrides = {"attention": args.attention, "dtype": args.dtype}
    context = contextlib.nullcontext()
    shardings = None
    if mesh.size > 1:
        cfg = checkpoint.checkpoint_config(path, **overrides)
        shardings = param_shardings(abstract_model(cfg), mesh, sharding.DEFAULT_RULES)
        context = sharding.use_rules(mesh, sharding.DEFAULT_RULES)
    model = checkpoint.load_model(path, shardings=shardings, **overrides)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer {tok_path} has {tokenizer.vocab_size} tokens, more than the model's "
                          f"vocab_size of {model.config.vocab_size}; pass the model's own --tokenizer.")
    return Generator(model, tokenizer), context


def run(main, argv=None) -> None:
    """Calls main(argv), turning a user's mistake into one stderr line and exit code 2."""
    try:
        main(argv)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
