"""Compile a model into bundles from Python: the paper's ladder, and the default's measured
sensitivity scored once and reused for two ladders.

    python examples/compile_model.py [MODEL] [--out bundles/]

MODEL is a Hugging Face folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct).
"""

import argparse
import json
from pathlib import Path

from lsaq_compile import (build_bundle, load_calibration, load_profile, load_tokenizer, open_model,
                          read_manifest, score_for_profile, score_model)

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?")
ap.add_argument("--out", default="bundles")
ap.add_argument("--calibration", help="UTF-8 text (default: Python's own documentation)")
args = ap.parse_args()

source = open_model(args.model)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

# The paper's method: Jaccard scores, INT4 on the least important 25/50/75% of layers.
calib = load_calibration(args.calibration, load_tokenizer(source), samples=32, seq_len=256)
jaccard = score_model(source, metrics=("jaccard",), calibration=calib)["jaccard"]
print("least important layers first (jaccard):", jaccard.order)
build_bundle(source.path, out / f"{source.path.stem}-paper", profile="paper", scores=jaccard, force=True)

# The default: measured sensitivity (KL of quantizing each layer's attention and MLP), measured
# once and reused for two ladders: evenly spaced bytes, and the paper's mixes' bytes.
prof = load_profile("default")
if args.calibration:
    prof.scoring.calibration = args.calibration
sens = score_for_profile(source, prof)
(out / "sensitivity.json").write_text(json.dumps(sens.to_json(), indent=1))
for ladder in ("bytes", "paper"):
    prof.build.ladder = ladder
    b = build_bundle(source.path, out / f"{source.path.stem}-{ladder}", profile=prof, scores=sens,
                     force=True)
    m = read_manifest(b)
    print(f"{b}: " + ", ".join(f"{v['name']} {v['weight_bytes'] / 2**20:.0f} MiB "
                               f"ppl {v['quality']['perplexity']:.2f}" for v in m["variants"]))
