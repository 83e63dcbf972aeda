"""ModelConfig: the architecture numbers of one DeepSeek LLM decoder, validated once.

A frozen dataclass (hashable, so it can be a static argument of `jax.jit`) built from the `model` section of an
ml_collections config. Every check raises `ConfigError` with one sentence that names the offending field.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax.errors import ConfigError  # noqa: F401  (re-exported: the model's config errors)

ATTENTION_BACKENDS = ("xla", "cudnn", "pallas", "blocked", "auto")
REMAT_POLICIES = ("none", "full", "save_dots")
LAYER_LOOPS = ("scan", "unrolled", "auto")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 102400
    d_model: int = 4096
    n_layers: int = 30
    n_heads: int = 32
    n_kv_heads: int = 32
    d_ff: int = 11008
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.006
    param_dtype: str = "float32"
    # Compute dtype; "auto" means bfloat16 on GPU/TPU and float32 on CPU.
    dtype: str = "auto"
    # xla (reference), cudnn, pallas, blocked (CPU), or auto (fastest available on the platform).
    attention: str = "xla"
    # Rematerialization of each layer in the backward pass: none, full, or save_dots (keep matmul outputs).
    remat: str = "none"
    # How the training forward runs the layers: scan (one compiled layer body, compile time flat in depth), unrolled
    # (a Python loop: no stacking of each layer's saved activations; 5-10% faster 16M-125M train steps on CPU,
    # experiments/results/bench_train_cpu.md), or auto (unrolled on CPU, scan on GPU/TPU).
    layer_loop: str = "auto"
    # Training losses run the output head and cross-entropy over chunks of this many sequence positions, so the
    # (batch, seq, vocab) float32 logits never exist at once (dsjax/train/loss.py); 0: the whole sequence at once.
    loss_chunk: int = 1024

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk must be a non-negative integer (0: no chunking), got "
                              f"{self.loss_chunk!r}.")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)!r}.")
        if not self.init_std >= 0:
            raise ConfigError(f"model.init_std must be non-negative, got {self.init_std!r}.")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}."
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention needs whole groups)."
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.d_model / model.n_heads = {self.d_model // self.n_heads} is odd; rotary embeddings "
                "need an even head dimension."
            )
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.attention={self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}."
            )
        if self.layer_loop not in LAYER_LOOPS:
            raise ConfigError(f"model.layer_loop={self.layer_loop!r} is not one of {', '.join(LAYER_LOOPS)}.")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r} is not one of {', '.join(REMAT_POLICIES)}.")
        if self.param_dtype not in DTYPES:
            raise ConfigError(f"model.param_dtype={self.param_dtype!r} is not one of {', '.join(DTYPES)}.")
        if self.dtype not in DTYPES + ("auto",):
            raise ConfigError(f"model.dtype={self.dtype!r} is not one of auto, {', '.join(DTYPES)}.")

    @classmethod
    def from_config(cls, model_section) -> "ModelConfig":
        """Builds from a ConfigDict/dict `model` section; unknown keys are an error, not ignored."""
        values = dict(model_section)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"model.{unknown[0]} is not a model setting (known: {', '.join(sorted(known))})."
            )
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 is plain multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        if self.dtype == "auto":
            return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        return jnp.dtype(self.dtype)

    @property
    def scan_layers(self) -> bool:
        """`layer_loop` resolved for the current platform."""
        if self.layer_loop == "auto":
            return jax.default_backend() != "cpu"
        return self.layer_loop == "scan"

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)
