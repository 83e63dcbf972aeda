"""The static description of one attention call that every kernel receives (hashable: a jit-static argument)."""

from __future__ import annotations

import dataclasses

from dsjax.kernels.blocks import BlockSizes


@dataclasses.dataclass(frozen=True)
class Plan:
    """`seq_len` is the real sequence length; arrays reaching a kernel are padded to `padded_len`, a multiple
    of every block size. `scale` is the softmax scale, head_dim ** -0.5 of the unpadded head dimension."""

    backend: str
    causal: bool
    seq_len: int
    padded_len: int
    blocks: BlockSizes
    scale: float
    interpret: bool
