"""setup.cfg pins the versions the suite runs: the export and resume use DeepSpeed internals (private
`zero_to_fp32` functions, its checkpoint engine, the classes its pickles hold) that change between
minor releases, so torch and deepspeed must have an upper bound, and the installed versions must be
inside the ranges."""

import configparser
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"


@pytest.mark.parametrize("name", ["torch", "deepspeed"])
def test_pinned_range_is_bounded_and_holds_the_installed_version(name):
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    reqs = {r.name: r for r in map(Requirement, filter(None, cfg["options"]["install_requires"].splitlines()))}
    spec = reqs[name].specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{name}{spec}: no upper bound"
    assert spec.contains(version(name), prereleases=True), f"installed {name} {version(name)} is outside {spec}"
