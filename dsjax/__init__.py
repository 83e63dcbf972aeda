"""dsjax: the DeepSeek LLM training stack in JAX/Flax."""

__version__ = "0.1.0"
