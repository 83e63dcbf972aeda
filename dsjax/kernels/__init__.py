"""Pallas flash attention for dsjax: our own blockwise online-softmax kernels, forward and backward.

- `flash_gpu`: Pallas Triton lowering (NVIDIA incl. H100, AMD), model layout, no transposes.
- `flash_tpu`: Mosaic TPU, heads-major layout.
Both share the masking and tile-skipping rules (`masking`) and the tile sizes (`blocks`); `api` ties them to a
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
