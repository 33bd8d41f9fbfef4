"""`alice-ds plot RUN_DIR`: PNG curves of a run's `metrics.jsonl`, for either kind of run.

- Pretraining (`deepspeed launch/train.py`, one line per logged step): `losses.png` (loss, cls,
  patch, recon, val_loss), `schedules.png` (lr, weight decay, teacher momentum and temperature),
  `monitors.png` (the collapse monitors of `alice_ds.losses.alice.MONITORS` and CASA's attention
  ratio), `throughput.png` (pairs/s = samples_per_s, step time, TFLOP/s per device, gradient norm,
  the pair sampler's acceptance rate and mean SAM score).
- Fine-tuning (`alice-ds finetune`): `loss.png` (training loss and lr) and `val_dice.png` (mean and
  per-class validation Dice).

Keys are matched by name; a panel whose keys a run does not log is left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alice_ds.console import console  # noqa: E402
from alice_ds.errors import DataError  # noqa: E402

DPI = 100
PRETRAIN_PANELS: dict[str, list[tuple[str, list[str], bool]]] = {
    # file: [(panel title, keys, log y axis)]
    "losses": [("loss", ["loss", "val_loss"], False), ("loss parts", ["cls", "patch", "recon"], True)],
    "schedules": [("learning rate", ["lr"], True), ("weight decay", ["weight_decay"], False),
                  ("teacher momentum", ["momentum"], False), ("teacher temperature", ["teacher_temp"], False)],
    "monitors": [("batch entropy of the teacher (nats)", ["cls_batch_entropy", "patch_batch_entropy"], False),
                 ("distinct teacher argmaxes", ["cls_distinct", "patch_distinct"], False),
                 ("KL(teacher || student)", ["cls_kl", "patch_kl"], False),
                 ("agreement, CASA attention ratio", ["agreement", "casa_attn_ratio"], False)],
    "throughput": [("pairs/s", ["samples_per_s"], False), ("step time (s)", ["step_time_s"], False),
                   ("TFLOP/s per device", ["tflops_per_device"], False), ("gradient norm", ["grad_norm"], True),
                   ("pair sampler", ["sampler_acceptance_rate", "sampler_mean_score"], False)],
}
"""Key names as `alice_ds.engine.trainer` writes them."""
FINETUNE_MARK = "val_dice"
PRETRAIN_MARK = "cls"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(path, "no metrics.jsonl in the run folder")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(path, f"line {n} has no 'step'")
        rows.append(row)
    if not rows:
        raise DataError(path, "metrics.jsonl is empty")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _figure(rows: list[dict], panels: list[tuple[str, list[str], bool]], title: str, path: Path) -> Path | None:
    panels = [p for p in panels if any(_series(rows, k)[0] for k in p[1])]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=DPI, squeeze=False)
    for ax, (name, keys, log) in zip(axes[0], panels):
        for key in keys:
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=key)
        if log and all(v > 0 for k in keys for v in _series(rows, k)[1]):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Write the PNGs of `run_dir/metrics.jsonl` into `out_dir` (default `run_dir/plots`)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    keys = set().union(*rows)
    if FINETUNE_MARK in keys:
        val = [r for r in rows if FINETUNE_MARK in r]
        classes = sorted(set().union(*(r.get("val_dice_per_class", {}) for r in val)))
        per_class = [{"step": r["step"], FINETUNE_MARK: r[FINETUNE_MARK], **r.get("val_dice_per_class", {})}
                     for r in val]
        figures = {"loss": (rows, [("training loss (DiceCE)", ["loss"], True), ("learning rate", ["lr"], True),
                                   ("step time (s)", ["seconds"], False)]),
                   "val_dice": (per_class, [("validation Dice", [FINETUNE_MARK, *classes], False)])}
        kind = "fine-tuning"
    elif PRETRAIN_MARK in keys or "loss" in keys:
        figures = {name: (rows, panels) for name, panels in PRETRAIN_PANELS.items()}
        kind = "pretraining"
    else:
        raise DataError(run_dir / "metrics.jsonl", "neither a pretraining nor a fine-tuning metrics file "
                                                   "(no 'loss' or 'val_dice' key)")
    written = []
    for name, (data, panels) in figures.items():
        p = _figure(data, panels, f"{run_dir.name} ({kind})", out / f"{name}.png")
        if p:
            written.append(p)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a pretraining (launch/train.py) or fine-tuning (alice-ds finetune) "
                                        "output folder holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    written = plot_run(args.run_dir, args.out)
    console.print(f"wrote {len(written)} plots: " + ", ".join(str(p) for p in written), highlight=False,
                  soft_wrap=True)
    return 0
