"""67b: DeepSeek LLM 67B base, the paper's numbers (Table 2 of arXiv 2401.02954 and the released HF config).

95 layers, d_model 8192, 64 query heads over 8 kv heads (grouped-query attention), SwiGLU 22016, vocab 102400,
context 4096; batch 4608 sequences of 4096 tokens, peak lr 3.2e-4, 2.0T tokens. 67.43B parameters.
"""

from dsjax.config import default_config

TRAINING_TOKENS = 2.0e12


def get_config():
    config = default_config()
    config.name = "67b"
    config.model.update(
        vocab_size=102400,
        d_model=8192,
        n_layers=95,
        n_heads=64,
        n_kv_heads=8,
        d_ff=22016,
        max_seq_len=4096,
        remat="save_dots",
    )
    config.train.update(global_batch_size=4608, seq_len=4096)
    config.train.steps = round(TRAINING_TOKENS / (4608 * 4096))
    config.optim.update(lr=3.2e-4, warmup_steps=2000)
    config.mesh.shape = (1, -1, 1)
    return config
