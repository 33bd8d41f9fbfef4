"""The typed config tree of a pretraining run (DESIGN §4, §6; STYLE "Config").

Precedence, lowest first: dataclass defaults < `--preset` (model size) < `--config presets/<name>.yaml`
< explicit command-line flags. The DeepSpeed JSON (`--deepspeed_config`) is the engine's config; the
trainer only fills the batch fields and the monitor paths into it (`resolve_ds_config`), and checks
what the user wrote there against the command line. The resolved tree is written to
`<output_dir>/config.json` and into every checkpoint's `alice_state.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from alice_ds.errors import UserError
from alice_ds.models import PRESETS as PRESET_FEATURE_SIZE  # preset name -> SwinUNETR feature size F

ROI_MULTIPLE = 32
"""SwinUNETR downsamples 5 times by 2: every crop edge must be a multiple of 32 voxels."""

LR_SCALING_BATCH = 256
"""Linear scaling rule (Goyal et al. 2017, as in DINO): peak lr = lr * global_batch / 256."""
MIN_LR_FRACTION = 0.02
"""Default final lr of the cosine decay as a fraction of the peak: the former fixed default 1e-6 at
lr 5e-5 and a global batch of 256, kept in proportion at any batch."""


@dataclass
class ModelConfig:
    preset: str = "B"
    """`tiny` | `B` | `L` | `H`: chooses `feature_size` (12, 48, 96, 192) unless it is set explicitly."""
    feature_size: int = 0
    """SwinUNETR feature size F (channels of the first stage); 0 = take it from `preset`."""
    use_v2: bool = False
    """SwinUNETR-v2 (residual conv blocks per stage), as in MONAI's `use_v2`."""
    checkpoint_activations: bool = False
    """Recompute the backbone's Swin blocks in the backward pass (less memory, ~30% more compute)."""
    out_dim: int = 512
    """Prototypes K of the cls (global) head; 512 in the reference code."""
    patch_out_dim: int = 512
    """Prototypes Kp of the patch (CASA) head; 512 in the reference code."""
    head_hidden_dim: int = 2048
    """Hidden width of the 3-layer head MLP (DINO: 2048)."""
    head_bottleneck_dim: int = 256
    """L2-normalised bottleneck before the weight-normalised last layer (DINO: 256)."""
    casa_heads: int = 8
    """Attention heads of the CASA cross-attention block."""
    casa_ffn_dim: int = 2048
    """Hidden width of the CASA feed-forward block."""

    def __post_init__(self):
        if self.preset not in PRESET_FEATURE_SIZE:
            raise UserError(f"model.preset must be one of {sorted(PRESET_FEATURE_SIZE)}, got {self.preset!r}")
        if self.feature_size == 0:
            self.feature_size = PRESET_FEATURE_SIZE[self.preset]
        if self.feature_size <= 0 or self.feature_size % 12:
            raise UserError(f"model.feature_size must be a positive multiple of 12 (SwinUNETR heads), "
                            f"got {self.feature_size}")
        for name in ("out_dim", "patch_out_dim", "head_hidden_dim", "head_bottleneck_dim", "casa_heads",
                     "casa_ffn_dim"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")


AUGMENT_ON = ("auto", "worker", "device")


@dataclass
class DataConfig:
    data_dir: str = ""
    """Root the datalist's relative paths refer to."""
    json_list: str = ""
    """Decathlon JSON datalist (`training`, `validation`)."""
    cache_dir: str = ""
    """Preprocessed cache written by `alice-ds preprocess` (int16 .npy per case)."""
    embed_dir: str | None = None
    """SAM embeddings (`alice-ds embed`); None = intra-case pairs only (no SAM matching)."""
    roi: int = 96
    """Crop edge in voxels (cubic crops); a multiple of 32. Reference code: 64."""
    spacing: tuple[float, float, float] | None = None
    """Voxel spacing of the cache in mm (x, y, z); None = read from the cache (recorded for the
    export); given, it must match the cache."""
    hu_window: tuple[float, float] = (-125.0, 225.0)
    """HU window mapped to [0, 1]."""
    mask_ratio: float = 0.75
    """Fraction of backbone patch tokens hidden from the student."""
    mask_block: int = 16
    """Edge of a mask block in voxels."""
    min_score: float = 0.7
    """Accept a SAM match when its similarity is at least this (paper code: 0.7)."""
    num_workers: int = 4
    """DataLoader worker processes per rank."""
    augment_on: str = "auto"
    """Where the views' rotation and noise are applied: `worker` (DataLoader workers, ~57 CPU-ms per
    pair at roi 96), `device` (workers only draw the parameters; the trainer applies them to the
    batch on the training device, one batched grid_sample), or `auto` = `device` on a GPU, `worker`
    on the CPU. Both draw the same parameters from the same per-sample generators."""
    overfit_one_batch: bool = False
    """Repeat the first batch forever (debugging: the loss must fall)."""

    def __post_init__(self):
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
        self.hu_window = tuple(float(h) for h in self.hu_window)
        if self.roi <= 0 or self.roi % ROI_MULTIPLE:
            raise UserError(f"--roi must be a positive multiple of {ROI_MULTIPLE}, got {self.roi}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"data.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise UserError(f"data.spacing must be three positive mm values, got {self.spacing}")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise UserError(f"data.hu_window must be [low, high] with low < high, got {self.hu_window}")
        if self.num_workers < 0:
            raise UserError(f"--num_workers must be >= 0, got {self.num_workers}")
        if self.augment_on not in AUGMENT_ON:
            raise UserError(f"--augment_on must be one of {', '.join(AUGMENT_ON)}, got {self.augment_on!r}")


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """Base learning rate; the peak is lr * global_batch / 256 (linear scaling)."""
    min_lr: float | None = None
    """Final learning rate of the cosine decay. None: MIN_LR_FRACTION of the scaled peak (1e-6 at
    the default lr and a global batch of 256, the former fixed default); a number must be below the
    peak."""
    warmup_steps: int = 1000
    """Linear lr warmup from 0 to the peak, in optimizer steps."""
    weight_decay: float = 0.04
    """Weight decay at step 0 (cosine to `weight_decay_end`); never applied to biases and norms."""
    weight_decay_end: float = 0.4
    momentum_start: float = 0.996
    """Teacher EMA momentum at step 0 (cosine to `momentum_end`)."""
    momentum_end: float = 1.0
    freeze_last_layer_steps: int = 1000
    """The heads' weight-normalised last layers get lr 0 for this many steps (DINO stability trick)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.min_lr is not None and self.min_lr < 0:
            raise UserError(f"optim.min_lr must be >= 0, got {self.min_lr}")
        if self.warmup_steps < 0 or self.freeze_last_layer_steps < 0:
            raise UserError("optim.warmup_steps and optim.freeze_last_layer_steps must be >= 0, got "
                            f"{self.warmup_steps} and {self.freeze_last_layer_steps}")
        for name in ("momentum_start", "momentum_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"optim.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class LossConfig:
    student_temp: float = 0.1
    teacher_temp: float = 0.01
    """cls teacher temperature after warmup (reference: 0.01)."""
    warmup_teacher_temp: float = 0.008
    teacher_patch_temp: float = 0.01
    warmup_teacher_patch_temp: float = 0.008
    warmup_teacher_temp_steps: int = 1000
    """Linear warmup of both teacher temperatures, in optimizer steps."""
    center_momentum: float = 0.9
    lambdas: tuple[float, float, float] = (1.0, 1.0, 10.0)
    """Weights of (cls, patch, recon) in the total loss."""
    recon_on: str = "masked"
    """`masked` (SimMIM-style, default) or `all` (the reference code) voxels in the recon MSE."""

    def __post_init__(self):
        self.lambdas = tuple(float(v) for v in self.lambdas)
        if self.recon_on not in ("masked", "all"):
            raise UserError(f"loss.recon_on must be 'masked' or 'all', got {self.recon_on!r}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "teacher_patch_temp",
                     "warmup_teacher_patch_temp"):
            if getattr(self, name) <= 0:
                raise UserError(f"loss.{name} must be positive, got {getattr(self, name)}")


@dataclass
class RunConfig:
    output_dir: str = ""
    """Checkpoints, metrics.jsonl, config.json and the DeepSpeed monitor CSVs go here."""
    deepspeed_config: str = ""
    """DeepSpeed JSON (ds_configs/*.json)."""
    batch_size: int = 2
    """Micro-batch per rank (samples, each a query+anchor pair)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    num_steps: int = 100000
    """Optimizer steps of the whole run (schedules span this)."""
    save_every: int = 1000
    """Checkpoint every N optimizer steps (and always at the end)."""
    keep_last: int = 3
    """Keep the newest K `step_<N>` checkpoints (0 = keep all); `best` is never removed."""
    val_every: int = 0
    """Validation loss every N steps on the `validation` split (0 = never); best -> tag `best`."""
    val_batches: int = 4
    """Micro-batches per rank in one validation pass."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    resume: str | None = None
    """`auto` (newest checkpoint in output_dir, if any) or a tag such as `step_2000`."""
    seed: int = 0
    max_nonfinite: int = 10
    """Stop with an error after this many consecutive steps with a NaN/Inf loss."""
    cudnn_benchmark: bool = True
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest (crops
    have one size, so this pays after the first steps); false for bitwise-repeatable GPU runs."""

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "num_steps", "log_every", "val_batches", "max_nonfinite"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("save_every", "keep_last", "val_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        """Build from a nested dict (YAML preset, `alice_state.json`); unknown keys are errors."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, values in d.items():
            if name not in sections:
                raise UserError(f"{source}: unknown section {name!r} (known: {sorted(sections)})")
            sub = _SECTIONS[name]
            known = {f.name for f in dataclasses.fields(sub)}
            bad = set(values) - known
            if bad:
                raise UserError(f"{source}: unknown key(s) {sorted(bad)} in section {name!r}")
            kwargs[name] = sub(**values)
        return cls(**kwargs)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "loss": LossConfig,
             "run": RunConfig}

# flag -> (section, field, type, help). `None` defaults: a flag only overrides when given.
_FLAGS = [
    ("--data_dir", "data", "data_dir", str, "root of the datalist's relative image paths"),
    ("--json_list", "data", "json_list", str, "decathlon JSON datalist (training/validation)"),
    ("--cache_dir", "data", "cache_dir", str, "preprocessed cache (`alice-ds preprocess`)"),
    ("--embed_dir", "data", "embed_dir", str, "SAM embeddings (`alice-ds embed`); omit for intra-case pairs only"),
    ("--roi", "data", "roi", int, "crop edge in voxels, multiple of 32 (default 96)"),
    ("--num_workers", "data", "num_workers", int, "DataLoader workers per rank (default 4)"),
    ("--augment_on", "data", "augment_on", str, "where views are rotated and noised: worker, device (the "
     "training GPU; workers only draw the parameters) or auto = device on a GPU, else worker (default auto)"),
    ("--output_dir", "run", "output_dir", str, "run directory: checkpoints/, metrics.jsonl, config.json, monitor/"),
    ("--deepspeed_config", "run", "deepspeed_config", str, "DeepSpeed JSON, e.g. ds_configs/zero2_bf16.json"),
    ("--batch_size", "run", "batch_size", int, "micro-batch of pairs per rank (default 2)"),
    ("--grad_accum", "run", "grad_accum", int, "micro-batches per optimizer step (default 1)"),
    ("--num_steps", "run", "num_steps", int, "optimizer steps of the run; schedules span them (default 100000)"),
    ("--save_every", "run", "save_every", int, "checkpoint every N steps, and at the end (default 1000)"),
    ("--keep_last", "run", "keep_last", int, "keep the newest K step_<N> checkpoints, 0 = all (default 3)"),
    ("--val_every", "run", "val_every", int, "validation loss every N steps, best -> tag `best`; 0 = off (default 0)"),
    ("--log_every", "run", "log_every", int, "metrics.jsonl line every N steps (default 1)"),
    ("--resume", "run", "resume", str, "`auto` (newest checkpoint in output_dir, if any) or a tag like step_2000"),
    ("--seed", "run", "seed", int, "seed of model init, sampling and augmentation (default 0)"),
    ("--lr", "optim", "lr", float, "base lr; peak = lr * global_batch / 256 (default 5e-5)"),
    ("--min_lr", "optim", "min_lr", float, "final lr of the cosine decay, below the peak (default 0.02 x the peak: 1e-6 at "
     "lr 5e-5 and a global batch of 256)"),
    ("--warmup_steps", "optim", "warmup_steps", int, "linear lr warmup steps (default 1000)"),
    ("--preset", "model", "preset", str, "model size: tiny (F=12), B (48), L (96), H (192) (default B)"),
    ("--feature_size", "model", "feature_size", int, "SwinUNETR feature size, overrides --preset"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of `launch/train.py` (reference-code names where users know them)."""
    parser.add_argument("--config", default=None,
                        help="YAML with sections model/data/optim/loss/run (e.g. presets/tiny.yaml); "
                             "flags given on the command line override it")
    for flag, _section, _name, typ, help_text in _FLAGS:
        parser.add_argument(flag, type=typ, default=None, help=help_text)
    parser.add_argument("--overfit_one_batch", action="store_true", default=None,
                        help="train on the first batch only (debugging: the loss must fall)")
    parser.add_argument("--cudnn_benchmark", action=argparse.BooleanOptionalAction, default=None,
                        help="on CUDA, let cuDNN pick the fastest convolution algorithms (default on; "
                             "--no-cudnn_benchmark for bitwise-repeatable GPU runs)")
    # DeepSpeed's launcher appends --local_rank=<n>; the rank itself is read from the environment.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a mapping of sections (model, data, optim, loss, run)")
    return d


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, preset, YAML and flags into a validated `TrainConfig`."""
    tree: dict[str, dict] = {name: {} for name in _SECTIONS}
    if args.config:
        for section, values in _load_yaml(args.config).items():
            if section not in tree or not isinstance(values, dict):
                raise UserError(f"{args.config}: unknown section {section!r} (known: {sorted(tree)})")
            tree[section].update(values)
    for flag, section, name, _typ, _help in _FLAGS:
        value = getattr(args, flag[2:])
        if value is not None:
            tree[section][name] = value
    if args.preset is not None and args.feature_size is None:
        tree["model"]["feature_size"] = 0  # a preset given on the command line wins over a YAML size
    if args.overfit_one_batch:
        tree["data"]["overfit_one_batch"] = True
    if args.cudnn_benchmark is not None:
        tree["run"]["cudnn_benchmark"] = args.cudnn_benchmark
    cfg = TrainConfig.from_dict(tree, source=args.config or "command line")
    for flag, value in (("--output_dir", cfg.run.output_dir), ("--deepspeed_config", cfg.run.deepspeed_config),
                        ("--cache_dir", cfg.data.cache_dir), ("--json_list", cfg.data.json_list)):
        if not value:
            raise UserError(f"{flag} is required (on the command line or in --config)")
    return cfg


def lr_range(cfg: TrainConfig, world_size: int) -> tuple[float, float]:
    """(peak, final) lr of the schedule: peak = lr * global_batch / 256; final = min_lr, or
    MIN_LR_FRACTION of the peak when unset (a fixed default would exceed the peak of a small global
    batch, e.g. one GPU); and the check the reference code lacked (its 'decay' rose)."""
    global_batch = cfg.run.batch_size * cfg.run.grad_accum * world_size
    peak = cfg.optim.lr * global_batch / LR_SCALING_BATCH
    if cfg.optim.min_lr is None:
        return peak, MIN_LR_FRACTION * peak
    if cfg.optim.min_lr >= peak:
        raise UserError(f"min_lr {cfg.optim.min_lr:g} must be below the peak lr {peak:g} "
                        f"(= lr {cfg.optim.lr:g} * global batch {global_batch} / {LR_SCALING_BATCH}); "
                        "lower --min_lr or raise --lr")
    return peak, cfg.optim.min_lr


def resolve_ds_config(path: str, cfg: TrainConfig, world_size: int, monitor_dir: str) -> dict:
    """Read the DeepSpeed JSON and fill the batch fields from the command line. A number written in
    the JSON must agree with the command line (or be "auto"); anything else is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: DeepSpeed config not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    want = {
        "train_micro_batch_size_per_gpu": cfg.run.batch_size,
        "gradient_accumulation_steps": cfg.run.grad_accum,
        "train_batch_size": cfg.run.batch_size * cfg.run.grad_accum * world_size,
    }
    for key, value in want.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise UserError(f"{path}: {key} is {given} but the command line gives {value} "
                            "(--batch_size x --grad_accum x world size); set it to \"auto\"")
        ds[key] = value
    if "optimizer" in ds or "scheduler" in ds:
        raise UserError(f"{path}: remove the 'optimizer'/'scheduler' sections; the trainer builds AdamW "
                        "with per-step lr/wd/momentum schedules itself")
    if ds.get("fp16", {}).get("enabled"):
        raise UserError(f"{path}: fp16 is not supported (use torch_autocast bf16, see ds_configs/README.md)")
    if ds.get("bf16", {}).get("enabled"):
        raise UserError(f"{path}: 'bf16' casts the teacher to bf16, where its EMA rounds away; use "
                        "\"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"} (ds_configs/README.md)")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) == 3 and zero.get("stage3_param_persistence_threshold", 1) != 0:
        raise UserError(f"{path}: ZeRO-3 needs \"stage3_param_persistence_threshold\": 0 so student and "
                        "teacher shards line up for the EMA")
    ds["csv_monitor"] = {"enabled": True, "output_path": monitor_dir, "job_name": "alice"}
    try:
        import tensorboard  # noqa: F401
        ds["tensorboard"] = {"enabled": True, "output_path": monitor_dir, "job_name": "alice"}
    except ImportError:
        pass
    return ds


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    return cfg.run.batch_size * cfg.run.grad_accum * world_size
