"""LSAQ runtime: load the most precise precompiled variant of a bundle that fits the device.

    import lsaq_runtime
    model = lsaq_runtime.load("bundle/", context=2048)
    print(model.variant, model.decision.reason)
    for piece in model.stream("The capital of France is", max_new_tokens=16):
        print(piece, end="", flush=True)

Depends on onnxruntime, numpy, tokenizers, jsonschema and jinja2 only (never torch).

The bundle format is defined in `format` (BUNDLE_FORMAT.md in prose) and read by `manifest`.
Loading runs these stages, one module each: `probe` (free memory), `planner` (which variant
fits), `verify` (the bundle's and the variant's files), `session` (ONNX Runtime and the KV
cache), `model` (`open_bundle` once, `load_variant` per decision; `load` composes them).
`serve` is the HTTP server (`lsaq-run serve`).
"""

from .errors import LsaqRuntimeError, NoVariantFits
from .manifest import load_manifest, validate_manifest
from .model import Model, OpenedBundle, decide, load, load_variant, open_bundle
from .planner import Decision, plan
from .probe import Device
from .sizes import format_size, parse_size
from .verify import verify_bundle

__version__ = "0.1.0"
__all__ = ["load", "decide", "open_bundle", "load_variant", "Model", "OpenedBundle", "Decision",
           "LsaqRuntimeError", "NoVariantFits", "load_manifest", "validate_manifest",
           "verify_bundle", "parse_size", "format_size", "plan", "Device"]
