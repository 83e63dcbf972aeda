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
    # 540 steps of 32 pairs: about 4 epochs of the ~4400 train pairs 20000 problems give from a tiny_sft at exact
    # match 0.93. Fewer pairs overfit: 3000 problems (~540 pairs) at 60 steps of lr 1e-3 lowered exact match 0.953 ->
    # 0.923, at 400 steps to 0.797 (README, DPO).
    config.train.update(init_from="runs/tiny_sft", steps=540, global_batch_size=32, seq_len=128)
    config.data.datasets = "synthetic"
    config.dpo.update(beta=0.1, loss="sigmoid", exact_match_examples=800, max_new_tokens=16)
    # 800 held-out problems (SFT's exact-match set) give ~190 held-out pairs: 300 gave 65, too few to read accuracy.
    config.dpo.update(synthetic_prompts=20000, synthetic_val_prompts=800)
    # RPO (Pang et al. 2024, iterative reasoning preference optimization, on pairs labelled by correctness as these
    # are): plain DPO at lr 1e-3, from an earlier tiny_sft at exact match 0.17, pushed both responses down
    # (logps/chosen -3.6 -> -22) and exact match to 0.01; the chosen responses' NLL keeps them likely.
    config.dpo.update(sft_weight=1.0)
    config.optim.update(lr=3e-4, warmup_steps=5, schedule="cosine", min_lr_ratio=0.1)
    config.checkpoint.update(every_steps=270)
    config.eval.update(every_steps=90, steps=0)  # steps 0: every held-out pair
    config.log.samples = ()
    return config
