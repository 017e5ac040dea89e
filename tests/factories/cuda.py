"""Does an ONNX Runtime session really run on CUDA here? The listed providers prove nothing:
onnxruntime-gpu without its CUDA libraries lists CUDA and runs on the CPU. Used by the GPU-only
tests (skipped where this says no) and by tools/device_check/providers.py."""

from __future__ import annotations


def cuda_session_providers() -> list[str] | None:
    """The providers a one-node session created with CUDA first actually uses; None where
    CUDA is not listed or the session cannot be made."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    try:
        s = ort.InferenceSession(m.SerializeToString(),
                                 providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:   # noqa: BLE001 - no usable CUDA: the caller says so
        return None
    return s.get_providers()


def cuda_runs() -> bool:
    providers = cuda_session_providers()
    return bool(providers) and providers[0] == "CUDAExecutionProvider"
