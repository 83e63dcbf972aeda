"""tiny: a 1.8M-parameter DeepSeek-shaped decoder that trains in about five minutes on a laptop CPU.

Same architecture as 7B/67B (pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU, untied head), scaled down.
"""

from dsjax.config import default_config


def get_config():
    config = default_config()
    config.name = "tiny"
    config.model.update(
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=384,
        max_seq_len=512,
        attention="auto",  # blocked on CPU: the quickstart's train step runs faster (README, The model)
    )
    # 350 steps of 32 x 128 tokens (1.4M tokens): about five minutes on a 2-core laptop CPU (README). At this budget
    # a small model seeing more tokens learns more than a wider one; lr 3e-3 beat 1e-2 here.
    config.train.update(steps=350, global_batch_size=32, seq_len=128)
    config.optim.update(lr=3e-3, warmup_steps=20)
    config.checkpoint.update(every_steps=100, every_minutes=5.0)
    config.eval.update(every_steps=100, steps=8)
    return config
