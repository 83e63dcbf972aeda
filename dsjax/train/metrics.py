"""Training metrics: FLOPs and MFU, and one writer for the console, `metrics.jsonl` and TensorBoard.

FLOPs per trained token (forward + backward = 3x forward, 2 FLOPs per multiply-add):

    6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

N_matmul counts the weights used in matrix multiplies: every parameter except the input embedding (a gather) and the
RMSNorm gains; the output head is included. The second term is attention's QK^T and PV products, counted over the
full sequence, not halved for the causal mask: the convention of the DeepSeek paper's M (its
12 * n_layer * d_model * l_seq term) and of PaLM's MFU, so numbers compare across papers.
MFU = achieved FLOPs/s / (devices * peak FLOPs/s per device).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax

from dsjax.model import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against `device.device_kind`.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    head_dim = cfg.head_dim
    attention = cfg.d_model * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    per_layer = attention + 3 * cfg.d_model * cfg.d_ff
    return cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring for the convention)."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def peak_flops(device=None, override: float | None = None) -> float | None:
    if override:
        return override
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return flops
    return None


class MetricsWriter:
    """Appends each record to metrics.jsonl and TensorBoard (process 0 only); tqdm shows the latest on the console."""

    def __init__(self, workdir: Path, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, record: dict):
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
