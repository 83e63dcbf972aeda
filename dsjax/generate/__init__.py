"""Text generation with a KV cache: prefill, a device-side decode loop, sampling, and the chat template.

    from dsjax.generate import generate
    out = generate(model, tokenizer, ["def main(", "import "], max_new_tokens=32)   # greedy
    out.texts, out.ids

CLIs: `python -m dsjax.generate --checkpoint=PATH --prompt=...` and `python -m dsjax.chat --checkpoint=PATH`.
"""

from dsjax.generate.generator import Completion, Generations, Generator, generate, param_shardings, shard_model
from dsjax.generate.sampling import SamplingParams

__all__ = ["Completion", "Generations", "Generator", "SamplingParams", "generate", "param_shardings", "shard_model"]
