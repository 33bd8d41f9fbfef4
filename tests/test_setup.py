"""setup.cfg pins the versions the suite runs: the export and resume use DeepSpeed internals (private
`zero_to_fp32` functions, its checkpoint engine, the classes its pickles hold) that change between
minor releases, so torch and deepspeed must have an upper bound, and the installed versions must be
inside the ranges."""

import configparser
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from alice_ds.cli import COMMANDS, main

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"


@pytest.mark.parametrize("name", ["torch", "deepspeed"])
def test_pinned_range_is_bounded_and_holds_the_installed_version(name):
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    reqs = {r.name: r for r in map(Requirement, filter(None, cfg["options"]["install_requires"].splitlines()))}
    spec = reqs[name].specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{name}{spec}: no upper bound"
    assert spec.contains(version(name), prereleases=True), f"installed {name} {version(name)} is outside {spec}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_explains_itself(command, capsys):
    """`alice-ds COMMAND --help` prints its options and exits 0 (argparse %-formats every help string:
    a bare '%' in one crashes the whole page)."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: alice-ds {command}") and "--" in out
