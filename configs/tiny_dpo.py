"""tiny_dpo: DPO of the tiny_sft model on its own answers to the synthetic problems, labelled by correctness, offline.

    python -m dsjax.main                      # the quickstart: pretrains runs/tiny
    python -m dsjax.main --config=tiny_sft    # SFT on the synthetic conversations: runs/tiny_sft
    python -m dsjax.main --config=tiny_dpo    # this: held-out rewards/accuracies and exact match, before/after
    python -m dsjax.chat                      # talk to the result

The pairs (dsjax/train/tasks/dpo_synthetic.py) are sampled from runs/tiny_sft before training and cached; the
reference is runs/tiny_sft too, its log-probs precomputed. The paper's DPO settings are for 7B/67B (lr 5e-6, batch
512, one epoch): the numbers here are our choice for a ~2M-parameter model within minutes on a laptop CPU.
"""

from dsjax.config import load_config


def get_config():
    config = load_config("tiny")
    config.name = "tiny_dpo"
    config.task = "dpo"
    # 60 steps of 32 pairs: about 3.5 epochs of the ~540 train pairs a tiny_sft at exact match 0.95 gives; 400 steps
    # overfit them (held-out logps/chosen -0.75 -> -5.2, exact match 0.95 -> 0.80; README, DPO).
    config.train.update(init_from="runs/tiny_sft", steps=60, global_batch_size=32, seq_len=128)
    config.data.datasets = "synthetic"
    config.dpo.update(beta=0.1, loss="sigmoid", exact_match_examples=300, max_new_tokens=16)
    # RPO (Pang et al. 2024, iterative reasoning preference optimization, on pairs labelled by correctness as these
    # are): plain DPO at this lr pushed both responses down (logps/chosen -3.6 -> -22) and exact match 0.17 -> 0.01;
    # the chosen responses' NLL keeps them likely.
    config.dpo.update(sft_weight=1.0)
    config.optim.update(lr=1e-3, warmup_steps=5, schedule="cosine", min_lr_ratio=0.1)
    config.checkpoint.update(every_steps=30)
    config.eval.update(every_steps=15, steps=0)  # steps 0: every held-out pair
    config.log.samples = ()
    return config
