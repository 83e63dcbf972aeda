"""Checkpoint conversion CLI.

  python -m dsjax.convert import-hf SRC DST   # Hugging Face LlamaForCausalLM safetensors dir -> dsjax checkpoint
  python -m dsjax.convert export-hf SRC DST   # dsjax workdir / checkpoint root / step dir -> HF safetensors dir

Options: --dtype (parameter dtype written; default: as stored), --overwrite (replace a non-empty DST).
Errors a user can cause end with one sentence on stderr and exit code 2; nothing half-written is left at DST.
"""

from __future__ import annotations

import argparse
import sys

from dsjax.interop import hf
from dsjax.model import ConfigError, param_count
from dsjax.train import checkpoint


def import_hf(src, dst, dtype=None, overwrite=False):
    model = hf.load_model(src, dtype=dtype)
    path = checkpoint.save_model(model, dst, overwrite=overwrite, meta={"source": f"hf:{src}"})
    print(f"imported {param_count(model):,} parameters from {src} into {path}")


def export_hf(src, dst, dtype=None, overwrite=False):
    model = checkpoint.restore_model(src)
    path = hf.save_model(model, dst, dtype=dtype, overwrite=overwrite)
    print(f"exported {param_count(model):,} parameters from {src} to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsjax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["import-hf", "export-hf"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    run = import_hf if args.command == "import-hf" else export_hf
    try:
        run(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except (hf.CheckpointError, checkpoint.CheckpointNotFound, FileExistsError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
