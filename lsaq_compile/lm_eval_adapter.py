"""lm-evaluation-harness adapter: evaluate one bundle variant as model `lsaq`.

lm-eval finds third-party models only once their module is imported, so run it through this
module, which registers `lsaq` and hands the rest of the command line to lm-eval:

    python -m lsaq_compile.lm_eval_adapter --model lsaq \\
        --model_args bundle=bundles/smollm2,variant=int4x15 --tasks piqa,arc_easy,boolq,hellaswag,winogrande

(needs `pip install -e ".[eval]"` and network access for the hub datasets). Log-likelihoods
come from the variant's ONNX graph through the runtime, the same path `lsaq-run` uses.
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .evaluate import _log_softmax


@register_model("lsaq")
class LsaqLM(LM):
    def __init__(self, bundle: str, variant: str | None = None, device: str = "cpu",
                 context: int | None = None, memory_budget: str | None = None, **kwargs):
        super().__init__()
        import lsaq_runtime

        self.model = lsaq_runtime.load(bundle, context=int(context) if context else None,
                                       memory_budget=memory_budget, device=device, variant=variant,
                                       log=lambda msg: None)
        self.max_length = self.model.context

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        return cls(**args)

    def _encode(self, text: str) -> list[int]:
        return self.model.codec.encode(text)

    def _score(self, context: str, continuation: str) -> tuple[float, bool]:
        # lm-eval's split: encode the whole string, the continuation is what follows the context
        whole = self._encode(context + continuation)
        n_ctx = len(self._encode(context)) if context else 0
        if n_ctx == 0:  # no context: condition on the first token of the continuation itself
            n_ctx = 1
        whole = whole[-self.max_length:] if len(whole) > self.max_length else whole
        cont = whole[n_ctx:]
        lp = _log_softmax(self.model.score_tokens(whole)[n_ctx - 1: len(whole) - 1])
        ll = float(lp[np.arange(len(cont)), cont].sum())
        return ll, bool(np.all(lp.argmax(-1) == np.asarray(cont)))

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [self._score(*r.args) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            ids = self._encode(r.args[0])
            total, step = 0.0, self.max_length
            for start in range(0, len(ids), step):
                chunk = ids[max(0, start - 1): start + step]
                lp = _log_softmax(self.model.score_tokens(chunk)[:-1])
                tgt = chunk[1:]
                total += float(lp[np.arange(len(tgt)), tgt].sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            context, gen_kwargs = r.args
            until = gen_kwargs.get("until") or []
            text = self.model.generate(context, max_new_tokens=int(gen_kwargs.get("max_gen_toks", 128)),
                                       temperature=float(gen_kwargs.get("temperature", 0.0)))
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
