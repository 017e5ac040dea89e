"""What memory the device has free right now: GPUs through NVML, the host through /proc/meminfo.

Only free memory matters for planning; totals are shown for context. `index` of a GPU is its
CUDA ordinal after CUDA_VISIBLE_DEVICES, which is what ONNX Runtime's `device_id` means.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from .errors import LsaqRuntimeError
from .sizes import format_size


@dataclass
class Device:
    kind: str                # "cpu" or "cuda"
    index: int | None        # CUDA ordinal as ONNX Runtime sees it; None for the host
    name: str
    total_bytes: int
    free_bytes: int
    source: str              # where free_bytes came from: nvml, meminfo, psutil

    @property
    def label(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def describe(self) -> str:
        return (f"{self.label} ({self.name}): {format_size(self.free_bytes)} free of "
                f"{format_size(self.total_bytes)}")

    def to_json(self) -> dict:
        return asdict(self) | {"label": self.label}


def _visible(entries: str | None, count: int, uuids: list[str]) -> list[int]:
    """NVML indices visible to CUDA, in CUDA ordinal order.

    Like CUDA itself, the list stops at the first entry that matches no device; entries may be
    indices or (prefixes of) UUIDs such as GPU-8f2c...; an empty value hides every GPU."""
    if entries is None:
        return list(range(count))
    out: list[int] = []
    for raw in entries.split(","):
        e = raw.strip()
        if re.fullmatch(r"\d+", e):
            i = int(e)
            if i >= count:
                break
        elif e.startswith("GPU-") or re.fullmatch(r"[0-9a-fA-F-]{6,}", e):
            want = e if e.startswith("GPU-") else "GPU-" + e
            hits = [i for i, u in enumerate(uuids) if u.lower().startswith(want.lower())]
            if len(hits) != 1:
                break
            i = hits[0]
        else:
            break
        if i in out:  # CUDA rejects duplicates the same way
            break
        out.append(i)
    return out


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def probe_gpus(nvml=None, environ=None, notes: list[str] | None = None) -> list[Device]:
    """GPUs visible to this process, or [] when there is no NVML library, driver or GPU.

    No library or driver means no usable GPU, said nowhere. An NVML error after it started
    (in the middle of enumerating) is different: it is added to `notes`, so a caller that then
    plans for host memory says why."""
    environ = os.environ if environ is None else environ
    if nvml is None:
        try:
            import pynvml as nvml  # from nvidia-ml-py; optional
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no usable GPU here
        return []
    step = "counting GPUs"
    try:
        count = nvml.nvmlDeviceGetCount()
        step = "reading GPU handles"
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        devices = []
        for ordinal, i in enumerate(_visible(environ.get("CUDA_VISIBLE_DEVICES"), count, uuids)):
            step = f"reading the memory of GPU {i}"
            mem = nvml.nvmlDeviceGetMemoryInfo(handles[i])
            devices.append(Device("cuda", ordinal, _text(nvml.nvmlDeviceGetName(handles[i])),
                                  int(mem.total), int(mem.free), "nvml"))
        return devices
    except Exception as e:
        if notes is not None:
            notes.append(f"NVML failed while {step} ({type(e).__name__}: {e}); no GPU is "
                         "planned for, check the driver (nvidia-smi)")
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def _inactive_file(path: str, key: str) -> int:
    """Page cache the kernel reclaims before failing an allocation (from memory.stat)."""
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key and v.strip().isdigit():
                    return int(v)
    except OSError:
        pass
    return 0


def cgroup_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"
                 ) -> tuple[int, int] | None:
    """(limit, available) of this process's memory cgroup, or None without a limit.

    A container's memory limit, not MemAvailable, is what an allocation runs into. v2: the
    smallest memory.max - usage over this cgroup and its ancestors; v1: memory.limit_in_bytes -
    usage. Usage leaves out inactive file cache, which the kernel reclaims first."""
    best: tuple[int, int] | None = None

    def consider(limit, usage, inactive):
        nonlocal best
        if limit is None or usage is None or limit >= 1 << 60:  # v1 writes ~2^63 for no limit
            return
        avail = max(0, limit - max(0, usage - inactive))
        if best is None or avail < best[1]:
            best = (limit, avail)

    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        rel = path.strip("/")
        if hid == "0" and ctrls == "":  # v2 unified hierarchy: walk up to the root
            parts = rel.split("/") if rel else []
            for n in range(len(parts), -1, -1):
                d = os.path.join(root, *parts[:n])
                consider(_read_int(os.path.join(d, "memory.max")),
                         _read_int(os.path.join(d, "memory.current")),
                         _inactive_file(os.path.join(d, "memory.stat"), "inactive_file"))
        elif "memory" in ctrls.split(","):
            for d in (os.path.join(root, "memory", rel), os.path.join(root, "memory")):
                consider(_read_int(os.path.join(d, "memory.limit_in_bytes")),
                         _read_int(os.path.join(d, "memory.usage_in_bytes")),
                         _inactive_file(os.path.join(d, "memory.stat"), "total_inactive_file"))
    return best


def physical_cores(cpu_root: str = "/sys/devices/system/cpu", affinity: set[int] | None = None,
                   cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Physical cores this process may run on: the default thread count.

    Decode is memory-bound and hyperthreads share a core's units, so one thread per physical
    core is what ONNX Runtime's own default aims at; unlike that default this one respects the
    CPU affinity mask and a cgroup CPU quota (containers), where using more threads than cores
    makes every step wait on descheduled threads."""
    cpus = set(affinity) if affinity is not None else set(os.sched_getaffinity(0))
    cores = set()
    for c in cpus:
        topo = os.path.join(cpu_root, f"cpu{c}", "topology")
        pkg, core = _read_int(os.path.join(topo, "physical_package_id")), \
            _read_int(os.path.join(topo, "core_id"))
        cores.add((pkg, core) if core is not None else ("cpu", c))
    n = max(1, len(cores))
    quota = _cpu_quota(cgroup_root)
    return max(1, min(n, quota)) if quota else n


def usable_cpus(affinity: set[int] | None = None, cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Logical CPUs this process may run on at once: its affinity mask, capped by a cgroup CPU
    quota (containers)."""
    n = len(affinity if affinity is not None else os.sched_getaffinity(0))
    quota = _cpu_quota(cgroup_root)
    return max(1, min(n, quota) if quota else n)


def check_threads(threads: int | None, cpus: int | None = None) -> None:
    """Refuse more ONNX Runtime threads than CPUs: the extra threads only wait on each other
    (thousands of them stall the machine for minutes for a two-token answer)."""
    if threads is None:
        return
    cpus = usable_cpus() if cpus is None else cpus
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise LsaqRuntimeError(f"--threads must be a positive integer, not {threads!r}")
    if threads > cpus:
        raise LsaqRuntimeError(f"--threads {threads}: this process may use {cpus} CPU"
                               f"{'s' if cpus != 1 else ''} (its affinity and CPU quota); more "
                               "threads than CPUs only wait on each other; use --threads "
                               f"{cpus} or fewer, or leave it out (one per physical core)")


def _cpu_quota(root: str) -> int | None:
    """CPUs allowed by a cgroup quota (v2 cpu.max, v1 cfs_quota/period), rounded up."""
    try:
        quota, period = open(os.path.join(root, "cpu.max")).read().split()[:2]
        if quota != "max":
            return -(-int(quota) // int(period))
    except (OSError, ValueError):
        pass
    q = _read_int(os.path.join(root, "cpu", "cpu.cfs_quota_us"))
    p = _read_int(os.path.join(root, "cpu", "cpu.cfs_period_us"))
    if q and p and q > 0:
        return -(-q // p)
    return None


def probe_host(meminfo: str = "/proc/meminfo", cgroup_root: str = "/sys/fs/cgroup",
               proc_cgroup: str = "/proc/self/cgroup") -> Device:
    """Host memory available to a new allocation without swapping: MemAvailable, or less when
    this process sits in a memory cgroup (a container) with a tighter limit."""
    dev = None
    try:
        fields = {}
        with open(meminfo) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    fields[key] = int(rest.split()[0]) * 1024
        dev = Device("cpu", None, "host memory", fields["MemTotal"], fields["MemAvailable"], "meminfo")
    except (OSError, KeyError, ValueError, IndexError):
        pass
    if dev is None:
        try:
            import psutil
        except ImportError:
            raise LsaqRuntimeError("cannot read free host memory (no /proc/meminfo and no psutil); "
                                   "give it with --memory-budget SIZE") from None
        vm = psutil.virtual_memory()
        dev = Device("cpu", None, "host memory", int(vm.total), int(vm.available), "psutil")
    cg = cgroup_limit(cgroup_root, proc_cgroup)
    if cg is not None and cg[1] < dev.free_bytes:
        dev = Device("cpu", None, "host memory (container limit)", min(cg[0], dev.total_bytes),
                     cg[1], "cgroup")
    return dev


def parse_device(text: str) -> tuple[str, int | None]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (kind, index)."""
    t = (text or "auto").strip().lower()
    if t in ("auto", "cpu"):
        return t, None
    m = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", t)
    if not m:
        raise LsaqRuntimeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")
    return "cuda", int(m.group(1)) if m.group(1) else None


def choose_device(device: str = "auto", gpus: list[Device] | None = None,
                  host=probe_host, cuda_available: bool = True) -> tuple[Device, list[str]]:
    """The device to plan for, plus notes explaining the choice.

    auto: the visible GPU with the most free memory if ONNX Runtime can use CUDA, else the host."""
    kind, index = parse_device(device)
    notes: list[str] = []
    if kind == "cpu":
        return host(), notes
    gpus = probe_gpus(notes=notes) if gpus is None else gpus
    if kind == "cuda":
        if not gpus:
            why = notes[0] if notes else ("NVML found none; check the driver and "
                                          "CUDA_VISIBLE_DEVICES")
            raise LsaqRuntimeError(f"--device {device}: no GPU visible ({why}) — use --device cpu")
        if not cuda_available:
            raise LsaqRuntimeError(f"--device {device}: this onnxruntime has no CUDA provider; "
                                   "install onnxruntime-gpu in place of onnxruntime, or use --device cpu")
        if index is None:
            return max(gpus, key=lambda d: d.free_bytes), notes
        for g in gpus:
            if g.index == index:
                return g, notes
        raise LsaqRuntimeError(f"--device {device}: no such GPU; visible: "
                               + ", ".join(g.label for g in gpus))
    if gpus and cuda_available:
        best = max(gpus, key=lambda d: d.free_bytes)
        if len(gpus) > 1:
            notes.append(f"{best.label} has the most free memory of {len(gpus)} GPUs")
        return best, notes
    if gpus:
        notes.append("a GPU is present but this onnxruntime has no CUDA provider "
                     "(install onnxruntime-gpu); using the host")
    return host(), notes


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()
