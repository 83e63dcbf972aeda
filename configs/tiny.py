"""tiny: a ~5M-parameter DeepSeek-shaped decoder that trains in minutes on a laptop CPU.

Same architecture as 7B/67B (pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU, untied head), scaled down.
"""

from dsjax.config import default_config


def get_config():
    config = default_config()
    config.name = "tiny"
    config.model.update(
        vocab_size=4096,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=704,
        max_seq_len=512,
        attention="xla",
    )
    config.train.update(steps=300, global_batch_size=16, seq_len=256)
    config.optim.update(lr=3e-3, warmup_steps=30)
    config.checkpoint.update(every_steps=100, every_minutes=5.0)
    config.eval.update(every_steps=100, steps=4)
    return config
