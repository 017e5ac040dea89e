"""Does a session really run on CUDA? The listed providers prove nothing: onnxruntime-gpu
without its CUDA libraries lists CUDA and runs on the CPU. Prints what the session uses."""
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "p", [x], [y]),
                      opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 9
s = ort.InferenceSession(m.SerializeToString(),
                         providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("onnxruntime", ort.__version__, "from", ort.__file__, "- session providers:", s.get_providers())
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
raise SystemExit(0 if s.get_providers()[0] == "CUDAExecutionProvider" else 1)
