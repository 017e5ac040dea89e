"""Runtime-only stand-ins: schema-valid synthetic manifests and bundle folders (no compiler,
no graphs), fake devices and a fake NVML."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

from lsaq_runtime.format import SCHEMA_VERSION
from lsaq_runtime.probe import Device

GiB = 2**30


MiB = 2**20

def synthetic_manifest(layers: int = 8, layer_params: int = 2_000_000, base: int = 40 * MiB) -> dict:
    """A schema-valid manifest with the full ladder: fp16, int8, then 1..L INT4 layers."""
    def resident(precisions, provider):
        per = {"fp16": 2.0 if provider == "cuda" else 4.0, "int8": 1.03, "int4": 0.53}
        return int(base + sum(per[p] * layer_params for p in precisions))

    ladder = [("fp16", ["fp16"] * layers), ("int8", ["int8"] * layers)]
    order = list(range(layers))[::-1]  # least important first
    for n in range(1, layers + 1):
        prec = ["int8"] * layers
        for i in order[:n]:
            prec[i] = "int4"
        ladder.append((f"int4x{n:02d}", prec))
    variants, files = [], []
    for rank, (name, prec) in enumerate(ladder):
        counts = {p: prec.count(p) for p in ("fp16", "int8", "int4")}
        bits = (16 * counts["fp16"] + 8.25 * counts["int8"] + 4.25 * counts["int4"]) / layers
        providers = {}
        for prov, dtype, elem in (("cpu", "float32", 4), ("cuda", "float16", 2)):
            graph = f"{name}.{prov}.onnx"
            files.append({"path": graph, "bytes": 10, "sha256": "0" * 64})
            providers[prov] = {
                "graph": graph, "files": [graph, "weights/float.safetensors"], "dtype": dtype, "weight_bytes": resident(prec, "cuda"),
                "accuracy_level": 4 if prov == "cpu" else 0, "lm_head": "fp16",
                "resident_bytes": resident(prec, prov), "kv_bytes_per_token": 2 * layers * 2 * 32 * elem,
                "workspace": {"fixed_bytes": 1 * MiB, "per_token_bytes": 4096,
                              "per_token_sq_bytes": 16 if prov == "cpu" else 0},
                "stated_context": 2048, "workspace_bytes_at_stated_context": 0}
        variants.append({"name": name, "rank": rank, "precisions": prec, "layer_counts": counts,
                         "avg_bits": round(bits, 4), "avg_bits_nominal": round(bits, 4),
                         "weight_bytes": resident(prec, "cuda"), "providers": providers})
    files += [{"path": "weights/float.safetensors", "bytes": 10, "sha256": "0" * 64},
              {"path": "tokenizer/tokenizer.json", "bytes": 10, "sha256": "0" * 64}]
    return {
        "format": "lsaq-bundle", "schema_version": SCHEMA_VERSION, "created_by": "test",
        "model": {"name": "synthetic", "architecture": "LlamaForCausalLM", "num_layers": layers,
                  "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
                  "max_position_embeddings": 4096, "max_context": 4096, "tie_word_embeddings": False},
        "tokenizer": {"dir": "tokenizer", "bos_token_id": 1, "eos_token_ids": [2],
                      "add_bos_token": True, "chat_template": None},
        "deployment": {"context_length": 1024, "batch_size": 1,
                       "safety_margin": {"fraction": 0.10, "min_bytes": 8 * MiB},
                       "runtime_overhead_bytes": {"cpu": 100 * MiB, "cuda": 300 * MiB}},
        "variants": variants, "files": files,
    }

def host(free: int) -> Device:
    return Device("cpu", None, "test host", 64 * 2**30, int(free), "test")

def write_bundle(root: Path, m: dict | None = None) -> Path:
    """Files with real sizes and checksums for every entry of a synthetic manifest."""
    m = copy.deepcopy(m or synthetic_manifest(layers=3))
    root.mkdir(parents=True, exist_ok=True)
    for f in m["files"]:
        p = root / f["path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        data = f"content of {f['path']}\n".encode() * 3
        p.write_bytes(data)
        f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(m))
    return root

class FakeNVML:
    """The part of pynvml the probe uses, over a list of (name, uuid, total, free)."""

    def __init__(self, gpus, fail_init=False):
        self.gpus, self.fail_init, self.shutdown = gpus, fail_init, False

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.gpus[h][0].encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, h):
        return self.gpus[h][1]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=self.gpus[h][2], free=self.gpus[h][3], used=0)

TWO = [("GPU A", "GPU-aaaa1111-0000", 24 * GiB, 3 * GiB),
       ("GPU B", "GPU-bbbb2222-0000", 16 * GiB, 10 * GiB)]

HOST = lambda: Device("cpu", None, "host", 32 * GiB, 20 * GiB, "test")  # noqa: E731
