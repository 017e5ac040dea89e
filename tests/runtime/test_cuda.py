"""On a GPU only (skipped without onnxruntime-gpu and a CUDA device a session really runs on):
every variant's CUDA graph against its CPU graph, generation through `load`, and the memory
plan against what the GPU then holds. tools/device_check/run.sh runs these on a lent GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from factories.cuda import cuda_runs

pytestmark = pytest.mark.skipif(not cuda_runs(), reason="no CUDA session here (onnxruntime-gpu "
                                "and a GPU): run by tools/device_check/run.sh on a lent GPU")


def _logits(bundle, manifest, graph: str, provider: str, ids) -> np.ndarray:
    from lsaq_runtime.session import Runner, create_session

    dtype = "float16" if provider == "cuda" else "float32"
    session = create_session(bundle / graph, provider)
    if provider == "cuda":
        assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()
    r = Runner(session, manifest, dtype, len(ids) + 4, provider)
    out = np.asarray(r.run(ids, 0, len(ids)), np.float32).copy()
    r.close()
    return out


def test_every_cuda_graph_matches_its_cpu_graph(tiny_bundle):
    """The same ids through each variant's two graphs: the float16 CUDA graph within float16's
    error of the float32 CPU graph, and the same next token at nearly every position."""
    from lsaq_compile.bundle import read_manifest

    m = read_manifest(tiny_bundle)
    ids = list(range(3, 60))
    for v in m["variants"]:
        graphs = {p: f["graph"] for p, f in v["providers"].items()}
        cpu = _logits(tiny_bundle, m, graphs["cpu"], "cpu", ids)
        cuda = _logits(tiny_bundle, m, graphs["cuda"], "cuda", ids)
        assert np.isfinite(cuda).all(), v["name"]
        assert np.abs(cuda - cpu).max() <= 0.05 * np.abs(cpu).max(), v["name"]
        agree = (cuda.argmax(-1) == cpu.argmax(-1)).mean()
        assert agree >= 0.9, (v["name"], agree)


def test_load_on_cuda_generates_what_the_cpu_does(tiny_bundle):
    """lsaq-run's loader on the GPU: a CUDA session really (not the silent CPU fallback), and
    greedy tokens that start as the CPU's do."""
    from lsaq_runtime.model import load

    gpu = load(tiny_bundle, device="cuda", context=128)
    assert gpu.provider == "cuda"
    assert gpu._runner.session.get_providers()[0] == "CUDAExecutionProvider"
    cpu = load(tiny_bundle, device="cpu", context=128, variant=gpu.variant)
    ids = list(range(3, 40))
    a = list(gpu.generate_ids(ids, 8))
    b = list(cpu.generate_ids(ids, 8))
    gpu.close()
    cpu.close()
    assert a[:4] == b[:4], (a, b)


def test_the_memory_plan_holds_on_the_gpu(tiny_bundle):
    """What the plan says a variant needs on the GPU is at least what the GPU holds for it
    once its cache is full: NVML's used memory before and after, in a fresh process (this one
    already holds a CUDA context: the probe above made one), the CUDA context included."""
    import json
    import subprocess
    import sys

    pytest.importorskip("pynvml")
    code = f"""
import json, pynvml
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
before = pynvml.nvmlDeviceGetMemoryInfo(h).used
from lsaq_runtime.model import load
model = load({str(tiny_bundle)!r}, device="cuda", context=256)
list(model.generate_ids(list(range(3, 200)), 50))     # the cache filled to 249 tokens
used = pynvml.nvmlDeviceGetMemoryInfo(h).used - before
print(json.dumps({{"need": model.decision.chosen_row.need_bytes, "used": used,
                  "variant": model.variant, "provider": model.provider}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"GPU, {got['variant']}: planned {got['need'] / 2**20:.1f} MiB, NVML {got['used'] / 2**20:.1f} MiB")
    assert got["provider"] == "cuda"
    assert got["used"] <= got["need"], got
