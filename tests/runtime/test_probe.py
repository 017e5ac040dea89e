"""Device probing with a fake NVML, CUDA_VISIBLE_DEVICES, host memory, and size parsing."""

from __future__ import annotations


import pytest

from lsaq_runtime.errors import LsaqRuntimeError
from lsaq_runtime.probe import choose_device, parse_device, probe_gpus, probe_host
from lsaq_runtime.sizes import format_size, parse_size
from factories.synthetic import FakeNVML, HOST, TWO

GiB = 2**30


def test_two_gpus_pick_most_free():
    gpus = probe_gpus(FakeNVML(TWO), environ={})
    assert [(g.label, g.name, g.free_bytes) for g in gpus] == [("cuda:0", "GPU A", 3 * GiB),
                                                               ("cuda:1", "GPU B", 10 * GiB)]
    dev, notes = choose_device("auto", gpus=gpus, host=HOST)
    assert dev.label == "cuda:1" and "most free" in notes[0]
    assert choose_device("cuda:0", gpus=gpus, host=HOST)[0].name == "GPU A"
    assert choose_device("cuda", gpus=gpus, host=HOST)[0].name == "GPU B"
    assert choose_device("cpu", gpus=gpus, host=HOST)[0].kind == "cpu"
    with pytest.raises(LsaqRuntimeError, match="no such GPU; visible: cuda:0, cuda:1"):
        choose_device("cuda:2", gpus=gpus, host=HOST)


@pytest.mark.parametrize("env, expected", [
    ("1", [("cuda:0", "GPU B")]),
    ("1,0", [("cuda:0", "GPU B"), ("cuda:1", "GPU A")]),
    ("GPU-aaaa", [("cuda:0", "GPU A")]),
    ("bbbb2222", [("cuda:0", "GPU B")]),
    ("0,7,1", [("cuda:0", "GPU A")]),   # CUDA stops at the first invalid entry
    ("", []),
    ("-1", []),
])
def test_cuda_visible_devices(env, expected):
    gpus = probe_gpus(FakeNVML(TWO), environ={"CUDA_VISIBLE_DEVICES": env})
    assert [(g.label, g.name) for g in gpus] == expected


def test_visible_devices_changes_auto_choice():
    gpus = probe_gpus(FakeNVML(TWO), environ={"CUDA_VISIBLE_DEVICES": "0"})
    dev, _ = choose_device("auto", gpus=gpus, host=HOST)
    assert dev.name == "GPU A" and dev.index == 0


def test_no_nvml_means_host():
    nvml = FakeNVML(TWO, fail_init=True)
    assert probe_gpus(nvml, environ={}) == []
    dev, _ = choose_device("auto", gpus=[], host=HOST)
    assert dev.kind == "cpu"
    with pytest.raises(LsaqRuntimeError, match="no GPU visible"):
        choose_device("cuda:0", gpus=[], host=HOST)


def test_real_probe_on_this_machine_does_not_crash():
    probe_gpus()  # nvidia-ml-py is installed; without a GPU its init fails and we get []
    dev = probe_host()
    assert dev.kind == "cpu" and 0 < dev.free_bytes <= dev.total_bytes


def test_gpu_without_cuda_provider():
    gpus = probe_gpus(FakeNVML(TWO), environ={})
    dev, notes = choose_device("auto", gpus=gpus, host=HOST, cuda_available=False)
    assert dev.kind == "cpu" and "onnxruntime-gpu" in notes[0]
    with pytest.raises(LsaqRuntimeError, match="onnxruntime-gpu"):
        choose_device("cuda:1", gpus=gpus, host=HOST, cuda_available=False)


def test_host_meminfo(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
                 "MemAvailable:    8000000 kB\n")
    dev = probe_host(str(p), cgroup_root=str(tmp_path / "no-cgroup"), proc_cgroup=str(tmp_path / "none"))
    assert (dev.total_bytes, dev.free_bytes, dev.source) == (16000000 * 1024, 8000000 * 1024, "meminfo")
    dev = probe_host(str(tmp_path / "missing"))  # psutil fallback
    assert dev.source == "psutil" and dev.free_bytes > 0


def test_parse_device():
    assert parse_device("auto") == ("auto", None)
    assert parse_device("CPU") == ("cpu", None)
    assert parse_device("cuda:3") == ("cuda", 3)
    assert parse_device("cuda") == ("cuda", None)
    with pytest.raises(LsaqRuntimeError, match="unknown device"):
        parse_device("tpu:0")


@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * 2**30), ("6GB", 6 * 10**9), ("6 gib", 6 * 2**30), ("512MiB", 512 * 2**20),
    ("512MB", 512 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("100KB", 100_000), ("100KiB", 102_400),
    ("1000", 1000), ("1000B", 1000), (4096, 4096), ("2TiB", 2 * 2**40), (".5GB", 500_000_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "six GiB", "6 GiBs", "-1GiB", "6G", "6 Gb/s", "1e9", "GiB", True])
def test_parse_size_errors(bad):
    with pytest.raises(LsaqRuntimeError, match="not a size|cannot be negative"):
        parse_size(bad)


def test_format_size():
    assert format_size(512 * 2**20) == "512 MiB"
    assert format_size(1.5 * 2**30) == "1.5 GiB"
    assert format_size(10) == "10 B"
