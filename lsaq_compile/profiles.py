"""Profiles: what to build and what to assume about the target (data/profiles/*.toml, shipped
as package data, so an installed lsaq-compile finds `default`, `paper` and `exact`).

The dataclass defaults below are the `default` profile; a test keeps default.toml equal to them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LsaqError
from .plan import check_ladder

PROFILES_DIR = Path(__file__).resolve().parent / "data" / "profiles"
MEASURES = ("exact", "fisher")   # scoring.measure
SCORING_DTYPES = ("auto", "float32", "bfloat16", "float16")   # scoring.dtype (fisher)
QUALITY_ENGINES = ("auto", "graphs", "streamed")   # build.quality_engine


def parse_size(text: str | int) -> int:
    """'512MiB', '6GiB', '1.5GB', '1000' -> bytes. Binary (KiB) and decimal (KB) units."""
    from lsaq_runtime.sizes import parse_size as _parse

    return _parse(text)


@dataclass
class BuildSection:
    ladder: str = "bytes"
    providers: list[str] = field(default_factory=lambda: ["cpu", "cuda"])
    max_context: int = 8192
    rungs: int = 8             # ladder "bytes": steps from all-INT4 to all-INT8 bytes
    refine: int = 1            # ladder "bytes"/"paper" with sensitivity: greedy swap rounds
    quality_samples: int = 16  # held-out calibration windows each variant's graph is measured on
    # how: graphs (each variant's CPU graph in ONNX Runtime: float32, 4 bytes a parameter),
    # streamed (torch, one decoder layer at a time, from the same stored weights) or auto
    # (graphs where they fit the memory available, as the float16 check decides)
    quality_engine: str = "auto"
    # held-out windows when quality streams (models whose graphs do not fit: 7B and up), where
    # each window costs every variant a pass of the whole model; 0: all quality_samples. The
    # ranking is by KL from FP16, paired on the same tokens: on SmolLM2, 4 windows rank the 11
    # variants as 16 do (docs/results/measurement.md)
    streamed_quality_samples: int = 4
    # ladder "bytes": extra variants at these average bits per quantized weight (decoder
    # linears, and the token tables when they are on the ladder; scales included), e.g. a target
    # device's budget or a peer's file size to compare at equal bytes
    rung_bits: list[float] = field(default_factory=list)


@dataclass
class ScoringSection:
    metric: str = "sensitivity"
    k: int = 10
    final_norm: bool = False
    calibration: str = ""
    samples: int = 4
    seq_len: int = 128
    granularity: str = "linear"  # sensitivity: linear (qkv, o, gate_up, down) | block (attention, MLP)
    # sensitivity: how each unit's KL cost is measured. exact: quantize it alone and run the
    # later layers and the full-vocabulary KL (layers^2 work, the whole model in memory);
    # fisher: a streamed second-order estimate from `probes` sampled-label gradients (a fixed
    # number of passes, one layer in memory; estimate.py), the token tables measured exactly
    measure: str = "fisher"
    probes: int = 16
    # fisher: the compute dtype of the estimate's forward and probe passes. auto: float32 on
    # the CPU, float16 on CUDA. bfloat16 runs about 2.3x faster on CPUs with bfloat16
    # instructions (AVX512-BF16, AMX) and was gated on SmolLM2 (docs/results/measurement.md);
    # the token tables and whole-plan checks always run at the device's exact dtype.
    dtype: str = "auto"


@dataclass
class QuantizationSection:
    scheme: str = "group"
    group_size: int = 32
    symmetric: bool = False
    block_size: int = 32
    cpu_accuracy_level: int = 4
    cpu_lm_head: str = "int8"
    clip: str = "mse-act"
    # the embedding table and LM head: "ladder" (INT8 or INT4 by measured sensitivity, like
    # the linears; ladder "bytes" only) or "fp16" (never quantized, as the paper)
    tables: str = "ladder"


@dataclass
class DeploymentSection:
    context_length: int = 2048
    batch_size: int = 1
    safety_margin_fraction: float = 0.10
    safety_margin_min: str = "64MiB"
    runtime_overhead_cpu: str = "80MiB"
    runtime_overhead_cuda: str = "600MiB"


@dataclass
class Profile:
    name: str = "default"
    build: BuildSection = field(default_factory=BuildSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    deployment: DeploymentSection = field(default_factory=DeploymentSection)

    @property
    def tables_on_ladder(self) -> bool:
        """Whether the embedding table and LM head get INT8/INT4 by measured sensitivity: the
        profile asks for it and allocates by bytes (the other ladders keep the paper's fp16
        tables)."""
        return self.quantization.tables == "ladder" and self.build.ladder == "bytes"

    def validate(self) -> "Profile":
        where = f"profile {self.name!r}"
        try:
            check_ladder(self.build.ladder, self.scoring.metric)
        except LsaqError as e:
            raise LsaqError(f"{where}: {e}") from None
        if self.build.quality_samples and "cpu" not in self.build.providers:
            raise LsaqError(f"{where}: build.quality_samples measures each variant's CPU graph; "
                            "add 'cpu' to build.providers or set quality_samples = 0")
        if self.build.quality_engine not in QUALITY_ENGINES:
            raise LsaqError(f"{where}: build.quality_engine must be 'auto', 'graphs' or "
                            f"'streamed', not {self.build.quality_engine!r}")
        bad = set(self.build.providers) - {"cpu", "cuda"}
        if bad or not self.build.providers:
            raise LsaqError(f"{where}: build.providers must name 'cpu' and/or 'cuda' (got {self.build.providers})")
        if self.scoring.metric not in ("jaccard", "cosine", "zscore", "sensitivity"):
            raise LsaqError(f"{where}: scoring.metric must be sensitivity, jaccard, cosine or zscore")
        if self.scoring.granularity not in ("block", "linear"):
            raise LsaqError(f"{where}: scoring.granularity must be 'block' (attention and MLP) "
                            f"or 'linear' (each stored linear), not {self.scoring.granularity!r}")
        if self.scoring.measure not in MEASURES:
            raise LsaqError(f"{where}: scoring.measure must be 'exact' (each unit's KL measured "
                            "alone) or 'fisher' (the streamed estimate), not "
                            f"{self.scoring.measure!r}")
        if self.scoring.dtype not in SCORING_DTYPES:
            raise LsaqError(f"{where}: scoring.dtype must be one of {', '.join(SCORING_DTYPES)}, "
                            f"not {self.scoring.dtype!r}")
        if self.quantization.scheme not in ("channel", "group"):
            raise LsaqError(f"{where}: quantization.scheme must be 'channel' or 'group'")
        if self.quantization.scheme == "group" and self.quantization.group_size not in (32, 64, 128):
            raise LsaqError(f"{where}: quantization.group_size must be 32, 64 or 128")
        if self.quantization.block_size not in (0, 16, 32, 64, 128, 256):
            raise LsaqError(f"{where}: quantization.block_size must be 16, 32, 64, 128, 256 or "
                            "0 (the largest that divides each weight's input size)")
        if self.quantization.cpu_lm_head not in ("fp16", "int8"):
            raise LsaqError(f"{where}: quantization.cpu_lm_head must be 'fp16' or 'int8'")
        if self.quantization.tables not in ("ladder", "fp16"):
            raise LsaqError(f"{where}: quantization.tables must be 'ladder' (INT8/INT4 by "
                            "measured sensitivity) or 'fp16', not "
                            f"{self.quantization.tables!r}")
        if self.quantization.clip not in ("none", "mse", "mse-act"):
            raise LsaqError(f"{where}: quantization.clip must be 'none', 'mse' or 'mse-act', "
                            f"not {self.quantization.clip!r}")
        if self.quantization.cpu_accuracy_level not in (0, 4):
            raise LsaqError(f"{where}: quantization.cpu_accuracy_level must be 4 (int8 "
                            "activations, fast) or 0 (float activations, exact)")
        if self.build.rung_bits and self.build.ladder != "bytes":
            raise LsaqError(f"{where}: build.rung_bits places variants of ladder 'bytes'; "
                            f"remove it or set ladder = \"bytes\"")
        for key, value, low in (("build.max_context", self.build.max_context, 1),
                                ("build.rungs", self.build.rungs, 1),
                                ("build.refine", self.build.refine, 0),
                                ("build.quality_samples", self.build.quality_samples, 0),
                                ("build.streamed_quality_samples",
                                 self.build.streamed_quality_samples, 0),
                                ("scoring.k", self.scoring.k, 1),
                                ("scoring.probes", self.scoring.probes, 1),
                                ("scoring.samples", self.scoring.samples, 1),
                                ("scoring.seq_len", self.scoring.seq_len, 2),
                                ("deployment.context_length", self.deployment.context_length, 1),
                                ("deployment.batch_size", self.deployment.batch_size, 1)):
            if value < low:
                raise LsaqError(f"{where}: {key} must be at least {low}, not {value}")
        if not 0 <= self.deployment.safety_margin_fraction <= 1:
            raise LsaqError(f"{where}: deployment.safety_margin_fraction must be between 0 and 1")
        for key in ("safety_margin_min", "runtime_overhead_cpu", "runtime_overhead_cuda"):
            try:
                parse_size(getattr(self.deployment, key))
            except Exception as e:
                raise LsaqError(f"{where}: deployment.{key}: {e}") from None
        return self


_SECTIONS = {"build": BuildSection, "scoring": ScoringSection,
             "quantization": QuantizationSection, "deployment": DeploymentSection}


def load_profile(name_or_path: str | None = None) -> Profile:
    """A profile by name (PROFILES_DIR/NAME.toml) or by path to a TOML file; None = default."""
    if name_or_path is None:
        name_or_path = "default"
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = PROFILES_DIR / f"{name_or_path}.toml"
        if not p.is_file():
            if name_or_path == "default":
                return Profile()
            known = sorted(x.stem for x in PROFILES_DIR.glob("*.toml")) if PROFILES_DIR.is_dir() else []
            raise LsaqError(f"unknown profile {name_or_path!r}; known: {', '.join(known) or 'default'}, "
                            "or give a path to a .toml file")
    if not p.is_file():
        raise LsaqError(f"{p}: profile file not found")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LsaqError(f"{p}: not valid TOML ({e})") from None
    prof = Profile(name=p.stem)
    for sec, values in data.items():
        if sec not in _SECTIONS:
            raise LsaqError(f"{p}: unknown section [{sec}]; known: {', '.join(_SECTIONS)}")
        cls = _SECTIONS[sec]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise LsaqError(f"{p}: unknown key(s) in [{sec}]: {', '.join(sorted(unknown))}")
        if not isinstance(values, dict):
            raise LsaqError(f"{p}: [{sec}] must be a table of keys")
        defaults = cls()
        for key, value in values.items():
            _check_type(p, sec, key, value, getattr(defaults, key))
        setattr(prof, sec, cls(**values))
    return prof.validate()


NUMBER_LISTS = {"rung_bits"}


def _check_type(p: Path, sec: str, key: str, value, default) -> None:
    """A profile value must have its default's type (an int is accepted for a float)."""
    want = type(default)
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    numbers = key in NUMBER_LISTS
    if want is list:
        ok = ok and all((isinstance(x, (int, float)) and not isinstance(x, bool)) if numbers
                        else isinstance(x, str) for x in value)
    if not ok:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                 list: "a list of numbers" if numbers else "a list of strings"}
        raise LsaqError(f"{p}: [{sec}] {key} must be {names.get(want, want.__name__)}, "
                        f"not {value!r}")
