"""The configuration of a fine-tuning run: what defines the model and its inputs (read back by
`alice-ds evaluate` and by a resume) and how it trains. Written to `<output_dir>/config.json` and
into every checkpoint's JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from alice_ds.data.cache import VIEW_HU_WINDOW
from alice_ds.data.preprocess import DEFAULT_SPACING
from alice_ds.errors import UserError
from alice_ds.finetune.data import ClassMap, check_roi


@dataclass
class FinetuneConfig:
    classes: ClassMap
    """Output classes 1..C-1 and the label values each one merges (0 = background)."""
    feature_size: int = 48
    """SwinUNETR width F; with weights it must be the file's (its `W.json` says)."""
    use_v2: bool = False
    """SwinUNETR v2 (extra convolution blocks in the Swin stages)."""
    roi: int = 96
    """Crop edge in voxels for training and the sliding window; a multiple of 32."""
    spacing: tuple[float, float, float] = DEFAULT_SPACING
    """Resampling grid in mm (x, y, z); with weights, pretraining's (from `W.json`)."""
    hu_window: tuple[float, float] = VIEW_HU_WINDOW
    """HU range mapped to [0, 1] (clipped); with weights, pretraining's."""
    weights: str | None = None
    """Pretrained weights (`alice-ds convert` output), None = from scratch."""
    steps: int = 1000
    """Optimizer steps."""
    lr: float = 5e-4
    """Peak AdamW learning rate (cosine to `lr * MIN_LR_FRACTION` after a linear warmup)."""
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    batch_size: int = 1
    """Cases per step and process; each gives `crops_per_case` crops."""
    crops_per_case: int = 2
    val_every: int = 100
    """Validate (and maybe save `best`) every N steps and at the last step; 0 = never."""
    save_every: int = 100
    """Write a resumable checkpoint every N steps and at the last step."""
    labelled: int | None = None
    """Use only the first K labelled training cases (None = all)."""
    seed: int = 0
    num_workers: int = 0
    """DataLoader workers per process (crops and flips); 0 = in the training process."""
    preprocessing_source: str = field(default="defaults")
    """Where spacing and HU window came from (a `W.json`, flags or the defaults)."""

    def __post_init__(self):
        check_roi(self.roi)
        checks = [("--steps", self.steps, self.steps >= 1), ("--lr", self.lr, self.lr > 0),
                  ("--batch_size", self.batch_size, self.batch_size >= 1),
                  ("--crops_per_case", self.crops_per_case, self.crops_per_case >= 1),
                  ("--val_every", self.val_every, self.val_every >= 0),
                  ("--save_every", self.save_every, self.save_every >= 1),
                  ("--warmup_steps", self.warmup_steps, 0 <= self.warmup_steps < self.steps),
                  ("--feature_size", self.feature_size, self.feature_size > 0 and self.feature_size % 12 == 0),
                  ("--labelled", self.labelled, self.labelled is None or self.labelled >= 1)]
        for name, value, ok in checks:
            if not ok:
                rule = {"--warmup_steps": "0 <= warmup < --steps",
                        "--feature_size": "a positive multiple of 12 (SwinUNETR)"}.get(name, "out of range")
                raise UserError(f"{name} {value}: {rule}")

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    def to_json(self) -> dict:
        d = asdict(self)
        d["classes"] = self.classes.to_json()
        d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_json(cls, d: dict) -> FinetuneConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["classes"] = ClassMap.from_json(d["classes"])
        known["spacing"] = tuple(known.get("spacing", cls.spacing))
        known["hu_window"] = tuple(known.get("hu_window", cls.hu_window))
        return cls(**known)
