"""LSAQ compiler: score layers, quantize, export ONNX variants into a bundle."""

__version__ = "0.1.0"
