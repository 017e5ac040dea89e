"""The runtime must stay light: importing it and generating never imports torch & co."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), str(REPO)])}
FORBIDDEN = ("torch", "transformers", "onnx", "lsaq_compile", "safetensors", "gguf")

CHECK = """
import sys
{body}
bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})
print("FORBIDDEN:", ",".join(bad))
"""


def _run(body: str) -> str:
    r = subprocess.run([sys.executable, "-c", CHECK.format(body=body, forbidden=FORBIDDEN)],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_import_is_light():
    assert _run("import lsaq_runtime, lsaq_runtime.cli") == "FORBIDDEN:"


def test_generate_does_not_import_torch(tiny_bundle):
    body = (f"import lsaq_runtime\n"
            f"m = lsaq_runtime.load({str(tiny_bundle)!r}, context=64, device='cpu')\n"
            f"m.generate('hello world', max_new_tokens=4)\n"
            f"m.score_tokens([1, 2, 3])\n")
    assert _run(body) == "FORBIDDEN:"
