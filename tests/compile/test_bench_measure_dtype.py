"""benchmarks/bench_measure_dtype.py on a tiny model: its table compares what it says."""

from __future__ import annotations

import sys

from factories.data import REPO
from factories.models import make_tiny_model

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_measure_dtype as bench  # noqa: E402


def test_the_table_puts_float16_beside_float32_and_the_probes_noise(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "m", num_hidden_layers=2)
    assert bench.main(["--model", str(model), "--windows", "1", "--seq-len", "16",
                       "--probes", "2"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| float")]
    assert [r.split(" | ")[0] for r in rows] == ["| float16 against float32, same probes",
                                                  "| float32, other probes (the estimator's noise)"]
    spearman = [float(r.split(" | ")[1]) for r in rows]
    # float16 holds these weights; other probes are another sample: float16 agrees better
    assert spearman[0] > 0.99 and spearman[0] > spearman[1]
    assert "1 x 16 tokens, 2 probes, 16 costs" in out   # 4 units x 2 layers x 2 precisions
