"""The kernels lower for their real hardware, from a CPU machine.

Interpret mode checks the arithmetic but never runs the Triton or Mosaic lowering rules. Cross-platform
lowering (`.lower(lowering_platforms=...)`) does: it turns the GPU kernel into Triton IR and the TPU kernel into
Mosaic MLIR exactly as on the device, catching unsupported operations, non-power-of-two Triton tensors and bad
block shapes. The Triton IR is also run through MLIR's verifier, which jax leaves to the GPU compiler: it
catches ill-typed IR (it once caught a select whose Python-int operands lowered as i1). What follows on the
device (Triton's PTX generation, Mosaic's layout passes) still needs the hardware or, for Triton, the
`triton` package: see kernels/README.md.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from dsjax.kernels import flash_attention

PLATFORM = {"gpu": "cuda", "tpu": "tpu"}
KERNELS = ("fwd", "dkdv", "dq")


@pytest.fixture
def verify_triton_ir(monkeypatch):
    """Verifies every Triton module the GPU kernels lower to (a private jax hook: skipped if it moves)."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as registration

        lower = registration.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError):
        return

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        assert result.module.operation.verify()  # raises with the first error when the IR is invalid
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)


@pytest.fixture
def pretend_h100(monkeypatch):
    """jax >= 0.11 asks the machine's GPU for its compute capability while lowering Triton; answer for an H100
    (a private jax hook: absent in older jax, which needs no answer)."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        return
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: h100)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize(
    "causal,segments,group,seq,head_dim,dtype",
    [
        (True, False, 1, 2048, 128, jnp.bfloat16),
        (True, True, 8, 1000, 128, jnp.bfloat16),
        (False, True, 4, 512, 64, jnp.float32),
    ],
)
def test_lowers_for_device(
    backend, causal, segments, group, seq, head_dim, dtype, monkeypatch, verify_triton_ir, pretend_h100
):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # pretend to be on the device
    q = jax.ShapeDtypeStruct((2, seq, 2 * group, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, seq, 2, head_dim), dtype)
    segment_ids = jax.ShapeDtypeStruct((2, seq), jnp.int32) if segments else None

    def forward_backward(q, k, v, segment_ids):
        attention = lambda q, k, v: flash_attention(q, k, v, segment_ids, causal=causal)
        out, vjp = jax.vjp(attention, q, k, v)
        return vjp(out)

    try:
        lowered = jax.jit(forward_backward).trace(q, kv, kv, segment_ids).lower(lowering_platforms=(PLATFORM[backend],))
    except RuntimeError as error:
        if "compilation handler" in str(error):  # newer jaxlib compiles Triton while lowering: needs a CUDA jaxlib
            pytest.skip(f"this jaxlib cannot compile Triton here: {error}")
        raise
    names = set(re.findall(r"dsjax_flash_(\w+?)_" + backend, lowered.as_text()))
    assert names == set(KERNELS)
