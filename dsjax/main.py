"""python -m dsjax.main --config=NAME: builds the model of a config and runs a forward pass (trainer to come)."""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from dsjax.config import load_config, model_config
from dsjax.model import ConfigError, abstract_model, init_model, param_count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsjax.main")
    parser.add_argument("--config", default="tiny")
    args = parser.parse_args(argv)
    try:
        cfg = model_config(load_config(args.config))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"config {args.config}: {param_count(abstract_model(cfg)):,} parameters, {cfg}")
    if cfg.d_model > 1024:
        print("(large config: shown abstractly; nothing allocated)")
        return 0
    model = init_model(cfg, seed=0)
    tokens = jnp.zeros((2, 64), jnp.int32)
    start = time.perf_counter()
    logits = jax.block_until_ready(model(tokens))
    print(f"forward of tokens {tokens.shape} -> logits {logits.shape} {logits.dtype} in "
          f"{time.perf_counter() - start:.2f}s on {jax.devices()[0].platform}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
