"""How much work the whole-plan passes of a default build do, counted from a finished bundle's
measured costs (a benchmark, not a test): state-layers (one plan's state carried through one
decoder layer, about one forward of the calibration tokens through that layer each), per pass,
with and without the kept states (estimate.PlanStates: the FP16 reference's, kept by the
token-table pass, and the first pass's).

    python benchmarks/bench_plan_states.py BUNDLE SOURCE [--rungs 8]

BUNDLE: a bundle built with the default profile (its manifest keeps the measured costs);
SOURCE: the model it was built from (only its shapes are read). The allocation is re-run on the
manifest's costs: the first pass's plans are the knapsack's, and one refinement round's
candidates follow from them and the additive model alone (not from the measured KLs), so the
counts are the build's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]

from lsaq_compile import sensitivity  # noqa: E402
from lsaq_compile.estimate import _plan_of  # noqa: E402
from lsaq_compile.importance import Scores  # noqa: E402
from lsaq_compile.model_source import open_model  # noqa: E402
from lsaq_compile.quantize import QuantSettings  # noqa: E402


def state_layers(items, L: int, kept=frozenset()) -> int:
    """Distinct (embedding, precisions so far) a streamed pass computes, layer by layer, for
    items (precisions, embedding); each starts above the deepest state in `kept`."""
    start = {k: max((j for j in range(L) if (k[1], k[0][:j + 1]) in kept), default=-1)
             for k in items}
    return sum(len({(e, p[:i + 1]) for (p, e), s in start.items() if s < i}) for i in range(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("source")
    ap.add_argument("--rungs", type=int, default=8)
    args = ap.parse_args()
    m = json.loads((Path(args.bundle) / "manifest.json").read_text(encoding="utf-8"))
    src = open_model(args.source)
    schemes = QuantSettings.from_manifest(m.get("quantization")).schemes()
    sens = sensitivity.from_scores(Scores.from_json(m["scores"]), schemes)
    L = src.spec.num_layers
    passes = []

    class Recorder:   # the meter the allocation asks: records each pass, answers additively
        spec, source = src.spec, src

        def kl_many(self, plans):
            passes.append(plans)
            return [sensitivity.plan_costs(sens, p, t) for p, t in plans]

    tables = bool(sens.tables)
    sensitivity.ladder_plans(Recorder(), sens, schemes, "bytes", args.rungs, 1, None, [],
                             tables=tables)
    tied = src.spec.tie_word_embeddings
    ref = (("fp16",) * L, "fp16")
    items = [[ref] + [(p, e) for p, e, _ in (_plan_of(x, L, tied) for x in plans)]
             for plans in passes]
    kept = {(e, p[:i + 1]) for p, e in items[0] for i in range(L)}
    reference = {("fp16", ("fp16",) * (i + 1)) for i in range(L)}   # kept by the token-table pass
    # a check that this is the build's allocation: the rungs no swap improved ship the first
    # pass's plan itself
    shipped = {(tuple(v["precisions"]), tuple(sorted((v.get("tables") or {}).items())))
               for v in m["variants"]}
    same = sum((tuple(p), tuple(sorted(t.items()))) in shipped for p, t in passes[0])
    print(f"{m['model']['name']}: {L} layers; {same} of the first pass's {len(passes[0])} "
          "plans are shipped unchanged (the rungs no swap improved)\n")
    print("| pass | plans | state-layers | with the kept states (pass 1: the reference, from the token-table pass) |")
    print("|---|---|---|---|")
    for n, its in enumerate(items):
        full = state_layers(its, L)
        with_kept = state_layers(its, L, kept if n else reference)
        print(f"| {n + 1} | {len(passes[n])} | {full} | {with_kept} ({1 - with_kept / full:.0%} fewer) |")


if __name__ == "__main__":
    main()
