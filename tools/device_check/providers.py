"""Does a session really run on CUDA? The listed providers prove nothing: onnxruntime-gpu
without its CUDA libraries lists CUDA and runs on the CPU. Prints what the session uses (run
with tests/ on PYTHONPATH, as run.sh does)."""
import onnxruntime as ort
import torch
from factories.cuda import cuda_session_providers

used = cuda_session_providers()
print("onnxruntime", ort.__version__, "from", ort.__file__, "- listed:", ort.get_available_providers(),
      "- a session uses:", used)
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
raise SystemExit(0 if used and used[0] == "CUDAExecutionProvider" else 1)
