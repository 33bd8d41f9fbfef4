"""The command line of `launch/train.py`, generated from the config tree: every field of every section
is a flag of its own name (`--roi`, `--score_threshold`, `--lambdas 1 1 10`, `--casa off`; a switch
also as `--use_v2` / `--no-use_v2`), its help is the field's docstring and its default the dataclass default, grouped by
section in `--help`. Flags override `--config` YAML, which overrides `--preset`, which overrides
the defaults."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import cache
from pathlib import Path

import yaml

from alice_ds.engine.config import SECTIONS, TrainConfig, section_fields
from alice_ds.errors import ConfigError, UserError

REQUIRED = (("run", "output_dir"), ("run", "deepspeed_config"), ("data", "cache_dir"), ("data", "json_list"))
"""Fields a run cannot start without (on the command line or in --config)."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), whitespace folded."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _flag_kwargs(hint, default) -> dict:
    """argparse keywords for a field of type `hint` (None defaults: a flag only overrides when given)."""
    args = typing.get_args(hint)
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return {"type": args[0], "nargs": len(args), "metavar": "V"}
    if hint is bool:  # `--casa off`, `--casa on`, `--casa` (= on); `--no-casa` is added beside it
        return {"type": on_off, "nargs": "?", "const": True, "metavar": "on|off"}
    return {"type": hint}


def on_off(text: str) -> bool:
    """argparse type of a switch: on/off (also true/false, yes/no, 1/0)."""
    value = {"on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML with sections model/data/sampler/optim/loss/run (e.g. presets/tiny.yaml); "
                             "flags given on the command line override it")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints, docs = section_fields(section), field_docs(cls)
        for f in dataclasses.fields(cls):
            default = _default(f)
            shown = "unset" if default is None else (" ".join(map(str, default)) if isinstance(default, tuple)
                                                    else default)
            if isinstance(default, bool):
                shown = "on" if default else "off"
            group.add_argument(f"--{f.name}", default=None, dest=f.name,
                               help=f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%"),
                               **_flag_kwargs(hints[f.name], default))
            if hints[f.name] is bool:
                group.add_argument(f"--no-{f.name}", action="store_false", dest=f.name, default=None,
                                   help=argparse.SUPPRESS)
    # DeepSpeed's launcher appends --local_rank=<n>; the rank itself is read from the environment.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return d


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, preset, YAML and flags into a validated `TrainConfig`."""
    tree: dict[str, dict] = {name: {} for name in SECTIONS}
    if args.config:
        for section, values in _load_yaml(args.config).items():
            if section not in tree or not isinstance(values, dict):
                raise ConfigError(f"{args.config}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
            tree[section].update(values)
    source = args.config or "command line"
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name)
            if value is not None:
                tree[section][f.name] = value
    if args.preset is not None and args.feature_size is None:
        tree["model"]["feature_size"] = 0  # a preset given on the command line wins over a YAML size
    cfg = TrainConfig.from_dict(tree, source=source)
    for section, name in REQUIRED:
        if not getattr(getattr(cfg, section), name):
            raise UserError(f"--{name} is required (on the command line or as {section}.{name} in --config)")
    return cfg
