"""lm-evaluation-harness adapter: evaluate one bundle variant as model `lsaq`.

lm-eval finds third-party models only once their module is imported, so run it through this
module, which registers `lsaq` and hands the rest of the command line to lm-eval:

    python -m lsaq_compile.lm_eval_adapter --model lsaq \\
        --model_args bundle=bundles/smollm2,variant=int4x15 --tasks piqa,arc_easy,boolq,hellaswag,winogrande

(needs `pip install -e ".[eval]"` and network access for the hub datasets). Offline, `zero_shot`
runs the paper's five tasks from local files with lm-eval's own task definitions
(`lsaq-compile eval BUNDLE --tasks all --data DIR --cross-check` from the command line). Log-likelihoods come from the variant's ONNX
graph through the runtime, the same path `lsaq-run` uses.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .evaluate import token_logprobs


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
        self._eot = min(self.model.codec.eos_ids) if self.model.codec.eos_ids else 0

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        return cls(**args)

    def _encode(self, text: str) -> list[int]:
        return self.model.codec.encode(text)

    def _request(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(tokens, context tokens), split as lm-eval's HF model splits them."""
        from .evaluate import split_request

        if context:
            whole, n_ctx = split_request(self._encode, context, continuation)
        else:  # lm-eval conditions an empty context on the end-of-text token
            whole, n_ctx = [self._eot] + self._encode(continuation), 1
        if len(whole) > self.max_length:  # keep the end, as lm-eval's HF model does
            cut = len(whole) - self.max_length
            whole, n_ctx = whole[cut:], max(1, n_ctx - cut)
        return whole, n_ctx

    def _score(self, context: str, continuation: str) -> tuple[float, bool]:
        return self.loglikelihood([_Args((context, continuation))])[0]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """All requests at once through the project's scorer (shared rows, batched runs); the
        prompts, choices and metrics stay lm-eval's."""
        from .evaluate import OnnxLogits, loglikelihoods

        return loglikelihoods(OnnxLogits.of(self.model), [self._request(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            ids = self._encode(r.args[0])
            total, step = 0.0, self.max_length
            for start in range(0, len(ids), step):
                chunk = ids[max(0, start - 1): start + step]
                total += float(token_logprobs(self.model.score_tokens(chunk), chunk[1:]).sum())
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


class _Args:
    """The one field of lm-eval's Instance that loglikelihood reads."""

    def __init__(self, args):
        self.args = args


def zero_shot(bundle, variant: str, names: list[str], data_dir, workdir, limit: int | None = None,
              lm: "LsaqLM | None" = None) -> dict[str, dict]:
    """Real lm-eval on the local copies of the zero-shot tasks (zeroshot.write_lm_eval_tasks):
    per task its metrics and stderrs, and per document the (context, continuation) requests
    lm-eval built and their log-likelihoods."""
    import os

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .zeroshot import write_lm_eval_tasks

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    registered = write_lm_eval_tasks(names, data_dir, workdir)
    lm = lm or LsaqLM(bundle=str(bundle), variant=variant, device="cpu")
    out = simple_evaluate(model=lm, tasks=list(registered.values()), limit=limit, log_samples=True,
                          task_manager=TaskManager(include_path=str(workdir)))
    res = {}
    for name, task in registered.items():
        r = out["results"][task]
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        res[name] = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none")}
        res[name]["items"] = len(samples)
        res[name]["loglikelihoods"] = [[float(x[0]) for x in s["filtered_resps"]] for s in samples]
        res[name]["requests"] = [[tuple(a) for a in s["arguments"]] for s in samples]
    return res


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
