"""7b: DeepSeek LLM 7B base, the paper's numbers (Table 2 of arXiv 2401.02954 and the released HF config).

30 layers, d_model 4096, 32 heads (plain multi-head: 32 kv heads), SwiGLU 11008, vocab 102400, context 4096;
batch 2304 sequences of 4096 tokens, peak lr 4.2e-4, 2.0T tokens. 6.910B parameters.
"""

from dsjax.config import default_config

TRAINING_TOKENS = 2.0e12


def get_config():
    config = default_config()
    config.name = "7b"
    config.model.update(
        vocab_size=102400,
        d_model=4096,
        n_layers=30,
        n_heads=32,
        n_kv_heads=32,
        d_ff=11008,
        max_seq_len=4096,
        remat="save_dots",
    )
    config.train.update(global_batch_size=2304, seq_len=4096)
    config.train.steps = round(TRAINING_TOKENS / (2304 * 4096))
    config.optim.update(lr=4.2e-4, warmup_steps=2000)
    config.mesh.shape = (1, -1, 1)
    return config
