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
