"""python -m dsjax.main --config=NAME [--config.section.key=value ...] [--workdir=DIR] [--profile]

NAME is a file in configs/ (tiny, 7b, 67b) or a path to a config .py file; with no flags it trains `tiny` on the
built-in corpus. The workdir (default runs/NAME) holds checkpoints, metrics.jsonl and TensorBoard events; running the
same command again resumes from its newest checkpoint.
"""

from __future__ import annotations

import difflib
import sys

from absl import flags
from ml_collections import config_flags

from dsjax.config import load_config, resolve_config_path
from dsjax.model.config import ConfigError


def _config_path(argv: list[str]) -> tuple[list[str], str]:
    """Rewrites --config=NAME to the file's path (config_flags wants a path); default tiny."""
    name = "tiny"
    out = [argv[0]]
    args = iter(argv[1:])
    for arg in args:
        if arg == "--config":
            name = next(args, name)
        elif arg.startswith("--config="):
            name = arg.split("=", 1)[1]
        else:
            out.append(arg)
    path = str(resolve_config_path(name))
    return out[:1] + [f"--config={path}"] + out[1:], name


def _check_override_keys(argv: list[str], config) -> None:
    """One sentence for a misspelt --config.a.b key (config_flags alone raises a traceback)."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                options = list(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, options, n=1)
                hint = f" (did you mean {'.'.join(walked + close)}?)" if close else ""
                where = ".".join(walked) or "the config"
                raise ConfigError(f"--config.{key}: {where} has no key {part!r}{hint}.")
            node = node[part]
            walked.append(part)


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        argv, name = _config_path(argv)
        _check_override_keys(argv, load_config(name))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "run config: a name in configs/ or a .py path", flag_values=fv)
    flags.DEFINE_string("workdir", None, "run directory (default runs/NAME)", flag_values=fv)
    flags.DEFINE_bool("profile", False, "record a jax.profiler trace of a few steps into WORKDIR/profile",
                      flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)", flag_values=fv)
    saved_argv, sys.argv = sys.argv, argv  # config_flags discovers --config.* overrides from sys.argv
    try:
        fv(argv)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv

    import jax

    from dsjax.config import validate
    from dsjax.train.loop import NonFiniteError, train

    if fv.distributed:
        jax.distributed.initialize()
    config = fv.config
    try:
        validate(config)
        result = train(config, fv.workdir or f"runs/{config.name}", profile=fv.profile)
    except (ConfigError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != "step" and isinstance(v, float))
    print(f"done: step {result.get('step')}" + (f", {numbers}" if numbers else " (the run was already complete)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
