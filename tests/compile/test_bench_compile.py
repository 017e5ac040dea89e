"""benchmarks/checkpoints.py measures a command from outside (anonymous memory of its process
tree, CPU seconds, a memory stop) and bench_compile.py extrapolates per layer."""

from __future__ import annotations

import sys

from factories.data import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_compile import extrapolate, stage_seconds, torch_gpu_mib  # noqa: E402
from checkpoints import SHAPES, cpu_description, layer_params, measure, table_params  # noqa: E402

# A child that holds 300 MiB of anonymous memory in a grandchild for a moment, burning CPU.
HOLD = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "'b = bytearray(300 << 20); import time; t = time.process_time()\\n"
        "while time.process_time() - t < 0.6: b[::4096] = bytes(len(b[::4096]))'])")


def test_measure_sees_a_grandchilds_memory_and_cpu():
    c = measure([sys.executable, "-c", HOLD], every=0.05)
    assert c.rc == 0 and not c.stopped
    assert 280 <= c.peak_anon_mib < 600, c
    assert c.cpu_s >= 0.5 and c.wall_s >= c.cpu_s * 0.5


def test_measure_stops_a_command_past_the_limit():
    c = measure([sys.executable, "-c", HOLD], stop_above_gib=0.1, every=0.05)
    assert c.rc != 0 and "passed 0.1 GiB" in c.stopped


def test_published_shapes_count_their_parameters():
    # Llama-2-7B: 6.74B parameters; Llama-3-8B: 8.03B (their model cards)
    for name, want in (("llama-2-7b", 6.74e9), ("llama-3-8b", 8.03e9), ("llama-2-70b", 68.98e9)):
        s = SHAPES[name]
        got = layer_params(s) * s["num_hidden_layers"] + table_params(s)
        assert abs(got - want) / want < 0.01, (name, got)


def test_extrapolation_is_fixed_plus_per_layer():
    rows = [dict(shape="llama-2-7b", profile="paper", layers=2, wall=100.0, cpu=150.0, anon=1000.0,
                 status="ok"),
            dict(shape="llama-2-7b", profile="paper", layers=4, wall=160.0, cpu=250.0, anon=1000.0,
                 status="ok"),
            dict(shape="llama-3-8b", profile="paper", layers=2, wall=1.0, cpu=1.0, anon=1.0,
                 status="failed")]
    (line,) = extrapolate(rows)
    cells = [c.strip() for c in line.strip("|").split("|")]
    # 100 + 30 s x 30 more layers = 1000 s = 17 min; CPU 150 + 50 x 30 = 1650 s = 28 min
    assert cells[:6] == ["llama-2-7b", "32", "6.7B", "paper", "17", "28"]
    assert cells[6] == "30.0 / 50.0 / 0" and cells[7] == "1.0"


def test_stage_seconds_count_each_interval_to_the_line_that_ends_it(tmp_path):
    """A build's progress lines report work just finished, so the time since the previous line
    is that line's stage's; a stage's layer sweeps are told apart; a log kept by measure()."""
    log = """[    3.0s] model: tiny from /x
[   10.0s] activations: layer 1/2 (7.0s)
[   12.0s] scoring: token tables embed_tokens: exact KL
[   20.0s] scoring: forward: layer 1/2, 4 layers/min
[   50.0s] scoring: backward: layer 1/2, 2 layers/min
[   80.0s] scoring: backward: layer 2/2, 2 layers/min
[   85.0s] allocating: 10 plans: layer 2/2, 3 layers/min
[   90.0s] quantizing 3/4: stored layer 1/2
[  100.0s] bundle written to /x in 99.9s
"""
    assert stage_seconds(log) == {"model": 3.0, "activations": 7.0, "scoring": 2.0,
                                  "scoring/forward": 8.0, "scoring/backward": 60.0,
                                  "allocating/10 plans": 5.0, "quantizing": 5.0, "other": 10.0}
    kept = tmp_path / "build.log"
    c = measure([sys.executable, "-c", "import sys; print('[    1.5s] model: x', file=sys.stderr)"],
                every=0.05, log_path=kept)
    assert c.rc == 0 and stage_seconds(kept.read_text()) == {"model": 1.5}


def test_the_cpu_is_described_by_name_and_the_instructions_speed_depends_on(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n")
    assert cpu_description(str(info)) == "AMD EPYC (avx2; no avx512f, avx512_bf16, amx_bf16)"
    info.write_text("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n")
    assert cpu_description(str(info)) == "Xeon (avx2, avx512f, avx512_bf16, amx_bf16)"
    info.write_text("model name\t: Old\nflags\t\t: sse2\n")
    assert cpu_description(str(info)) == "Old (none of avx2/avx512f/avx512_bf16/amx_bf16)"
    assert cpu_description(str(tmp_path / "absent"))     # no /proc: the platform's name


def test_the_builds_own_gpu_peak_is_read_from_its_log():
    log = ("[ 10.0s] bundle written to /x in 10.0s\n"
           "[ 10.0s] GPU memory: peak 12,345 MiB allocated by torch, 14,000 MiB reserved\n")
    assert torch_gpu_mib(log) == "12,345"
    assert torch_gpu_mib("[ 1.0s] bundle written to /x in 1.0s\n") is None
