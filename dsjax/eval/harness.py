"""A dsjax model for lm-evaluation-harness (0.4.x), registered as `dsjax`.

    python -m dsjax.eval.harness --model dsjax --model_args checkpoint=PATH,batch_size=16 --tasks hellaswag

runs lm-eval's own CLI with this model registered (lm-eval finds models only among the modules it imports, so
plain `lm_eval --model dsjax` cannot see it); from Python, `import dsjax.eval.harness` and then
`lm_eval.simple_evaluate(model="dsjax", model_args=...)`. Requests are tokenized by lm-eval's TemplateLM exactly as
for its `hf` model and scored by `dsjax.eval.scoring` (packed, bucketed, jitted, on a mesh; the requests of one
context, one per choice, run that context once), so per-request log-likelihoods match `hf` on the same weights.
bos is prepended when the tokenizer_config.json beside the tokenizer says `add_bos_token` (DeepSeek's does), as
`hf` does through its tokenizer; `add_bos_token=` overrides.
"""

from __future__ import annotations

import json
import sys

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dsjax.eval import runtime
from dsjax.eval.scoring import Scorer


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("dsjax")
class DsjaxLM(TemplateLM):
    """model_args: checkpoint (required), tokenizer, batch_size, max_length, add_bos_token, mesh ("-1,1,1"), dtype,
    attention, max_gen_toks. lm-eval's `device` and `max_batch_size` are accepted and ignored (the mesh decides)."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, batch_size=16, max_length=None,
                 add_bos_token=None, mesh: str = "-1,1,1", dtype: str | None = None, attention: str | None = None,
                 max_gen_toks: int = 256, device=None, max_batch_size=None, **unused):
        super().__init__()
        overrides = {k: v for k, v in (("dtype", dtype), ("attention", attention)) if v}
        shape = tuple(int(x) for x in str(mesh).replace(" ", "").split(";" if ";" in str(mesh) else ","))
        self.rt = runtime.load(checkpoint, tokenizer=tokenizer, mesh_shape=shape, **overrides)
        self.tokenizer_ = self.rt.tokenizer
        size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(self.rt.model, self.rt.mesh, self.rt.rules, batch_size=size)
        self._batch_size = size
        self._max_length = int(max_length) if max_length else self.rt.max_len
        self.add_bos_token = _flag(add_bos_token) if add_bos_token is not None else self._config_adds_bos()
        self._max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """model_args win over lm-eval's own --batch_size/--device (passed as additional_config)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    def _config_adds_bos(self) -> bool:
        config = self.tokenizer_.path.parent / "tokenizer_config.json"
        if not config.is_file():
            return False
        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("add_bos_token", False))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False

    # ------------------------------------------------------------------ what TemplateLM asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer_.encode(string)
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add and (not ids or ids[0] != self.tokenizer_.bos_id):
            ids = [self.tokenizer_.bos_id] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer_.decode(ids)

    def _score(self, sequences, n_scored, disable_tqdm, desc):
        bar = tqdm(total=len(sequences), desc=desc, disable=disable_tqdm or self.rank != 0, file=sys.stderr)
        try:
            return self.scorer.score(sequences, n_scored, lambda n, total: bar.update(n))
        finally:
            bar.close()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        for _, context_enc, continuation_enc in requests:
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation_enc)} tokens exceeds max_length {self.max_length}.")
        scored = self._score([list(c) + list(t) for _, c, t in requests], [len(t) for _, _, t in requests],
                             disable_tqdm, "dsjax loglikelihood")
        out = []
        for (request, _, _), s in zip(requests, scored):
            answer = (s.logprob, s.is_greedy)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        sequences, n_scored, owner = [], [], []
        for i, (string,) in enumerate(req.args for req in requests):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            for context, prediction in windows:
                sequences.append(list(context) + list(prediction))
                n_scored.append(len(prediction))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(sequences, n_scored, disable_tqdm, "dsjax loglikelihood_rolling")):
            totals[i] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from dsjax.eval.generation import generate_texts

        # Requests with the same generation arguments go to the generator together, in their original order.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [None] * len(requests)
        for key, indices in groups.items():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            contexts = [requests[i].args[0] for i in indices]
            if float(kwargs.get("temperature", 0.0)) > 0 and kwargs.get("do_sample", True):
                raise ValueError("the dsjax lm-eval model generates greedily; set temperature=0 for this task.")
            texts = generate_texts(self.rt.model, self.tokenizer_, contexts, max_new_tokens=max_new, stop=until,
                                   add_bos=self.add_bos_token, batch_size=self.batch_size, mesh=self.rt.mesh,
                                   rules=self.rt.rules)
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main() -> None:
    """lm-eval's own CLI, with the `dsjax` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
