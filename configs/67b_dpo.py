"""67b_dpo: Direct Preference Optimization of the DeepSeek LLM 67B SFT model: 7b_dpo's recipe on the 67B model.

The paper (arXiv 2401.02954, section 5) gives one DPO recipe for both sizes (one epoch, lr 5e-6, batch 512, warmup
then cosine); what it leaves unstated is 7b_dpo's choice. Usage as in 7b_dpo, with --config=67b_dpo and SFT a
67b_sft workdir, a dsjax checkpoint or a deepseek-llm-67b-chat directory.
"""

from dsjax.config import load_config, with_model


def get_config():
    config = with_model(load_config("7b_dpo"), "67b")
    config.name = "67b_dpo"
    config.train.update(init_from="runs/67b_sft")
    return config
