"""tiny_sft: fine-tunes the quickstart's `runs/tiny` on the synthetic conversations (dsjax/data/synthetic.py), offline.

    python -m dsjax.main                      # the quickstart: pretrains runs/tiny
    python -m dsjax.main --config=tiny_sft    # then this: held-out exact match and repetition ratio, before/after

The paper's SFT settings are for 7B/67B (tiny has none); the numbers here are our choice for a ~2M-parameter model
learning three small tasks within minutes on a laptop CPU. Small batches, many steps: at about the same tokens/s,
3600 steps of 8 rows learned more than 850 steps of 32 (README, SFT).
"""

from dsjax.config import load_config


def get_config():
    config = load_config("tiny")
    config.name = "tiny_sft"
    config.task = "sft"
    config.train.update(init_from="runs/tiny", steps=3600, global_batch_size=8, seq_len=128)
    config.data.datasets = "synthetic"
    config.optim.update(lr=3e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1)
    config.checkpoint.update(every_steps=900)
    config.eval.update(every_steps=900, steps=16)
    config.sft.update(repetition_prompts=100, exact_match_examples=800, max_new_tokens=16)
    config.log.samples = ()
    return config
