"""Pallas flash attention for dsjax: our own blockwise online-softmax kernels, forward and backward.

- `flash_gpu`: Pallas Triton lowering (NVIDIA incl. H100, AMD), model layout, no transposes.
- `flash_mosaic_gpu`: Pallas Mosaic GPU forward for Hopper (TMA, wgmma; bfloat16/float16), backend="mosaic_gpu";
  its backward is `flash_gpu`'s. Asked for by name: a GPU's default stays `flash_gpu`.
- `flash_tpu`: Mosaic TPU, heads-major layout.
All share the masking and tile-skipping rules (`masking`) and the tile sizes (`blocks`); `api` ties them to a
`custom_vjp`. The algorithm, block sizes and measured speed are described in kernels/README.md at the repo root.
"""

from dsjax.kernels.api import (
    INTERPRET_ENV,
    KERNELS,
    flash_attention,
    interpret_from_env,
    select_kernel,
)
from dsjax.kernels.blocks import BlockSizes, default_blocks
from dsjax.kernels.errors import UnsupportedError

__all__ = [
    "INTERPRET_ENV",
    "KERNELS",
    "BlockSizes",
    "UnsupportedError",
    "default_blocks",
    "flash_attention",
    "interpret_from_env",
    "select_kernel",
]
