"""LSAQ runtime: load the most precise precompiled variant of a bundle that fits the device.

    import lsaq_runtime
    model = lsaq_runtime.load("bundle/", context=2048)
    print(model.variant, model.decision.reason)
    for piece in model.stream("The capital of France is", max_new_tokens=16):
        print(piece, end="", flush=True)

Depends on onnxruntime, numpy, tokenizers, jsonschema and jinja2 only (never torch).
"""

from .errors import LsaqRuntimeError, NoVariantFits
from .manifest import load_manifest, validate_manifest, verify_bundle
from .model import Model, decide, load
from .planner import Decision, plan
from .probe import Device
from .sizes import format_size, parse_size

__version__ = "0.1.0"
__all__ = ["load", "decide", "Model", "Decision", "LsaqRuntimeError", "NoVariantFits",
           "load_manifest", "validate_manifest", "verify_bundle", "parse_size", "format_size",
           "plan", "Device"]
