"""The DeepSeek LLM decoder in Flax NNX."""

from dsjax.model.config import ConfigError, ModelConfig
from dsjax.model.transformer import Transformer, abstract_model, init_model, param_count

__all__ = ["ConfigError", "ModelConfig", "Transformer", "abstract_model", "init_model", "param_count"]
