"""LSAQ compiler: score layers, quantize, export ONNX variants into a bundle.

    import lsaq_compile as lc
    path = lc.build_bundle("model-folder", "bundle/", profile="default")
    print(lc.read_manifest(path)["variants"][0]["name"])

The names below are the public API (what examples/ uses); they are imported on first use, so
`import lsaq_compile` (and the CLI's start) does not load torch.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "build_bundle": "build", "score_for_profile": "build", "read_manifest": "bundle",
    "open_model": "model_source", "load_profile": "profiles", "Profile": "profiles",
    "load_calibration": "calibration", "load_tokenizer": "calibration",
    "score_model": "importance", "Scores": "importance", "QuantSettings": "quantize",
    "Progress": "progress", "LsaqError": "errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lsaq_compile' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
