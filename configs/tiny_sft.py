"""tiny_sft: fine-tunes the quickstart's `runs/tiny` on the synthetic conversations (dsjax/data/synthetic.py), offline.

    python -m dsjax.main                      # the quickstart: pretrains runs/tiny
    python -m dsjax.main --config=tiny_sft    # then this: held-out exact match and repetition ratio, before/after

The paper's SFT settings are for 7B/67B (tiny has none); the numbers here are our choice for a ~2M-parameter model
learning three small tasks within minutes on a laptop CPU.
"""

from dsjax.config import load_config


def get_config():
    config = load_config("tiny")
    config.name = "tiny_sft"
    config.task = "sft"
    config.train.update(init_from="runs/tiny", steps=850, global_batch_size=32, seq_len=128)
    config.data.datasets = "synthetic"
    config.optim.update(lr=5e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1)  # beat 3e-3 x 600 steps
    config.checkpoint.update(every_steps=200)
    config.eval.update(every_steps=200, steps=4)
    config.sft.update(repetition_prompts=100, exact_match_examples=300, max_new_tokens=16)
    config.log.samples = ()
    return config
