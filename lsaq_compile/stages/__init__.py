"""The compiler's stages, in pipeline order; each is `run(job, ctx) -> job` (see job.py).

    source       open the model (HF folder or GGUF); the bundle's tokenizer
    calibration  token windows of the calibration text; activation statistics (clip mse-act)
    scoring      layer importance, or each linear's measured sensitivity (resumable per linear)
    plan         the ladder: one precision plan per variant
    quantize     which tensors each plan needs at which precision
    store        quantize and stream the weights into the bundle's weight store
    graph        one ONNX graph per variant and provider (after the float16 check)
    writer       the manifest (a pure function of what came before), checksums, quality

`build.build_bundle` runs them in this order. A stage whose outputs the job record already
holds loads them instead of running again.
"""

from . import calibration, graph, plan, quantize, scoring, source, store, writer

PIPELINE = (source, calibration, scoring, plan, quantize, store, graph, writer)
