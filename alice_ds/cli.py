"""`alice-ds <command>`: one CLI for every stage of the pipeline (DESIGN §2).

Each command lives in the module that owns the work and exposes two functions:
`add_arguments(parser)` and `run(args) -> int` (exit status). Modules are imported lazily so that
`alice-ds --help` is fast and a command's heavy imports do not slow the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from alice_ds import __version__
from alice_ds.console import fail
from alice_ds.errors import UserError

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("alice_ds.data.phantom.cli", "write a synthetic abdominal/thoracic CT dataset (FLARE layout)"),
    "datalist": ("alice_ds.data.datalist", "scan a folder of NIfTI CTs and write a decathlon JSON datalist"),
    "preprocess": ("alice_ds.data.preprocess", "resample CTs to RAS + fixed spacing into a memory-mapped int16 cache"),
    "sam-train": ("alice_ds.sam.train", "self-supervised training of the SAM anatomical embedding network"),
    "embed": ("alice_ds.sam.embed", "write SAM fine/coarse embeddings (safetensors) for every cached case"),
    "sam-levels": ("alice_ds.sam.levels", "estimate each case's body level from SAM matches: the pair sampler's prior"),
    "match": ("alice_ds.sam.match_cli", "match a world-mm point of one case into another with SAM embeddings"),
    "sam-eval": ("alice_ds.sam.evaluate", "landmark matching accuracy of SAM embeddings across cases"),
    "convert": ("alice_ds.export.converter", "convert a ZeRO checkpoint into MONAI SwinUNETR weights (safetensors)"),
    "finetune": ("alice_ds.finetune.train", "fine-tune MONAI SwinUNETR (Accelerate) from alice-ds weights or scratch"),
    "evaluate": ("alice_ds.finetune.evaluate", "per-class Dice and HD95 of a fine-tuned checkpoint, overlay pictures"),
    "plot": ("alice_ds.finetune.plot", "PNG curves of a pretraining or fine-tuning run's metrics.jsonl"),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to an option's help only when X says something: not for required
    arguments, switches that are off, or help that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the `chosen` command's module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="alice-ds",
        description="Alice self-supervised pretraining for 3D CT. Pretraining itself runs with "
                    "`deepspeed launch/train.py`; these commands prepare data, SAM embeddings and "
                    "exported weights, and fine-tune, evaluate and plot.",
    )
    parser.add_argument("--version", action="version", version=f"alice-ds {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        p.set_defaults(_module=module)
        if chosen is None or chosen == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:

    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        fail(str(e))
        return 2
    except KeyboardInterrupt:
        fail("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
