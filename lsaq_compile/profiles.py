"""Profiles: what to build and what to assume about the target (profiles/*.toml).

The dataclass defaults below are the `default` profile, so the tool also works when installed
without the repository's profiles/ folder; a test keeps profiles/default.toml equal to them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LsaqError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


def parse_size(text: str | int) -> int:
    """'512MiB', '6GiB', '1.5GB', '1000' -> bytes. Binary (KiB) and decimal (KB) units."""
    from lsaq_runtime.sizes import parse_size as _parse

    return _parse(text)


@dataclass
class BuildSection:
    ladder: str = "full"
    providers: list[str] = field(default_factory=lambda: ["cpu", "cuda"])
    max_context: int = 8192


@dataclass
class ScoringSection:
    metric: str = "jaccard"
    k: int = 10
    final_norm: bool = False
    calibration: str = ""
    samples: int = 32
    seq_len: int = 256


@dataclass
class QuantizationSection:
    scheme: str = "channel"
    group_size: int = 32
    symmetric: bool = True


@dataclass
class DeploymentSection:
    context_length: int = 2048
    batch_size: int = 1
    safety_margin_fraction: float = 0.10
    safety_margin_min: str = "64MiB"
    runtime_overhead_cpu: str = "96MiB"
    runtime_overhead_cuda: str = "600MiB"


@dataclass
class Profile:
    name: str = "default"
    build: BuildSection = field(default_factory=BuildSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    deployment: DeploymentSection = field(default_factory=DeploymentSection)

    def validate(self) -> "Profile":
        where = f"profile {self.name!r}"
        if self.build.ladder not in ("full", "paper"):
            raise LsaqError(f"{where}: build.ladder must be 'full' or 'paper', not {self.build.ladder!r}")
        bad = set(self.build.providers) - {"cpu", "cuda"}
        if bad or not self.build.providers:
            raise LsaqError(f"{where}: build.providers must name 'cpu' and/or 'cuda' (got {self.build.providers})")
        if self.scoring.metric not in ("jaccard", "cosine", "zscore"):
            raise LsaqError(f"{where}: scoring.metric must be jaccard, cosine or zscore")
        if self.quantization.scheme not in ("channel", "group"):
            raise LsaqError(f"{where}: quantization.scheme must be 'channel' or 'group'")
        for key in ("safety_margin_min", "runtime_overhead_cpu", "runtime_overhead_cuda"):
            try:
                parse_size(getattr(self.deployment, key))
            except Exception as e:
                raise LsaqError(f"{where}: deployment.{key}: {e}") from None
        return self


_SECTIONS = {"build": BuildSection, "scoring": ScoringSection,
             "quantization": QuantizationSection, "deployment": DeploymentSection}


def load_profile(name_or_path: str | None = None) -> Profile:
    """A profile by name (profiles/NAME.toml) or by path to a TOML file; None = default."""
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
        setattr(prof, sec, cls(**values))
    return prof.validate()
