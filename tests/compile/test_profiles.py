import dataclasses
import tomllib

import pytest

from lsaq_compile.errors import LsaqError
from lsaq_compile.profiles import PROFILES_DIR, Profile, load_profile


def test_default_toml_equals_builtin_defaults():
    data = tomllib.loads((PROFILES_DIR / "default.toml").read_text())
    builtin = Profile()
    for sec, values in data.items():
        assert dataclasses.asdict(getattr(builtin, sec)) == values, sec


def test_paper_profile():
    p = load_profile("paper")
    assert p.build.ladder == "paper" and p.scoring.metric == "jaccard" and p.scoring.k == 10
    assert p.quantization.scheme == "channel"


def test_bad_profiles(tmp_path):
    with pytest.raises(LsaqError, match="unknown profile"):
        load_profile("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[build]\nladder = 'half'\n")
    with pytest.raises(LsaqError, match="ladder"):
        load_profile(str(bad))
    bad.write_text("[build]\nladders = 'full'\n")
    with pytest.raises(LsaqError, match="unknown key"):
        load_profile(str(bad))
    bad.write_text("[deployment]\nsafety_margin_min = 'lots'\n")
    with pytest.raises(LsaqError, match="safety_margin_min"):
        load_profile(str(bad))
    bad.write_text("[build\n")
    with pytest.raises(LsaqError, match="not valid TOML"):
        load_profile(str(bad))


def test_a_wheel_install_finds_every_profile(tmp_path):
    """Profiles are package data: a wheel installed away from the source tree resolves
    default, paper and exact by name (built and installed offline, no index)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"   # a copy: setuptools writes build/ and *.egg-info beside the sources
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for part in ("lsaq_compile", "runtime"):
        shutil.copytree(root / part, src / part, ignore=skip)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(root / part, src / part)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("lsaq-*.whl"))
    site = tmp_path / "site"
    r = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    # -I: neither PYTHONPATH nor the working folder; the wheel's folder goes first, ahead of
    # site-packages (where an editable install of a source tree may be: checked by __file__)
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import lsaq_compile.profiles as pr\n"
            "assert pr.__file__.startswith(%r), pr.__file__\n"
            "print(sorted(pr.load_profile(n).name for n in ('default', 'paper', 'exact')))\n"
            "print(sorted(p.stem for p in pr.PROFILES_DIR.glob('*.toml')))\n"
            % (str(site), str(site)))
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["['default', 'exact', 'paper']"] * 2, r.stdout
