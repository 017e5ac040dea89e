"""Run every variant of a bundle with whatever runtime dependencies this Python has.

Used by test_dependency_floors.py twice: once in the project's environment, once in a venv
holding exactly the floor versions pyproject declares; the two outputs must agree. Imports only
the runtime and its own dependencies (no torch, no onnx).

    python runtime_check.py BUNDLE OUT.json
"""

import json
import sys

import numpy as np

import lsaq_runtime
from lsaq_runtime.cli import main as cli_main
from lsaq_runtime.text import TextCodec

IDS = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def main(bundle: str, out: str) -> int:
    m = lsaq_runtime.load_manifest(bundle)
    assert lsaq_runtime.verify_bundle(bundle) == []
    result = {"versions": {}, "variants": {}}
    from importlib.metadata import version
    for name in ("numpy", "onnxruntime", "tokenizers", "click", "jsonschema", "jinja2"):
        result["versions"][name] = version(name)
    for v in m["variants"]:
        model = lsaq_runtime.load(bundle, context=32, device="cpu", variant=v["name"])
        logits = model.score_tokens(IDS)
        # three decode steps through the shared KV buffer, fed fixed tokens
        steps = [model.forward([t], len(IDS) + i)[-1] for i, t in enumerate([9, 8, 7])]
        result["variants"][v["name"]] = {
            "prefill": np.asarray(logits, np.float64).round(4).tolist(),
            "decode": np.asarray(steps, np.float64).round(4).tolist()}
        model.close()
    codec = TextCodec(__import__("pathlib").Path(bundle), m)
    codec.chat_template = CHATML
    result["chat"] = codec.apply_chat_template("hello")
    result["dry_run_exit"] = cli_main([bundle, "--dry-run", "--json", "--memory-budget", "64GiB"])
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
