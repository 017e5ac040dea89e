"""Compile a model into a bundle from Python: score once, reuse the scores for two profiles.

    python examples/compile_model.py [MODEL] [--out bundles/]

MODEL is a Hugging Face folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct).
"""

import argparse
import json
from pathlib import Path

from lsaq_compile.bundle import build_bundle, read_manifest
from lsaq_compile.calibration import load_calibration, load_tokenizer
from lsaq_compile.importance import score_model
from lsaq_compile.model_source import open_model

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?")
ap.add_argument("--out", default="bundles")
ap.add_argument("--calibration", help="UTF-8 text (default: Python's own documentation)")
args = ap.parse_args()

source = open_model(args.model)
calib = load_calibration(args.calibration, load_tokenizer(source), samples=32, seq_len=256)
scores = score_model(source, metrics=("jaccard",), calibration=calib)["jaccard"]
Path(args.out).mkdir(parents=True, exist_ok=True)
Path(args.out, "scores.json").write_text(json.dumps(scores.to_json(), indent=1))
print("least important layers first:", scores.order)

# The measurement is reused: the paper's ladder and the full ladder cost no second scoring pass.
for profile in ("paper", "default"):
    out = build_bundle(source.path, Path(args.out) / f"{source.path.stem}-{profile}",
                       profile=profile, scores=scores, force=True)
    m = read_manifest(out)
    print(f"{out}: {len(m['variants'])} variants, FP16 {m['variants'][0]['weight_bytes'] / 2**20:.0f} MiB "
          f"down to {m['variants'][-1]['name']} {m['variants'][-1]['weight_bytes'] / 2**20:.0f} MiB")
