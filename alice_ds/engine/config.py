"""The typed config tree of a pretraining run (DESIGN §4, §6; STYLE "Config").

Sections `model`, `data`, `sampler`, `optim`, `loss`, `run`; each field carries its documentation
as an attribute docstring, which is also its `--help` text (`engine/flags.py`). Precedence, lowest
first: dataclass defaults < `--preset` (model size) < `--config presets/<name>.yaml` < flags. Every
value is checked when its section is built (`ConfigError` naming `section.field` and the value),
before any process group starts. The trainer never changes a config: what a run derives from it
(final lr, where views are augmented, the cache spacing) comes from the pure `resolve`, and the
resolved tree is written to `<output_dir>/config.json` and into every checkpoint.
The DeepSpeed JSON (`--deepspeed_config`) is the engine's own config (`engine/ds_config.py`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from alice_ds.errors import ConfigError
from alice_ds.losses.alice import (
    CENTER_MOMENTUM,
    LAMBDAS,
    RECON_ON,
    STUDENT_TEMP,
    TEACHER_TEMP,
    WARMUP_TEACHER_TEMP,
    WARMUP_TEACHER_TEMP_STEPS,
)
from alice_ds.models.swin import PRESETS as PRESET_FEATURE_SIZE  # preset name -> SwinUNETR feature size F
from alice_ds.sampler.config import SamplerConfig

CASA_VIEWS = ("within", "cross")
CASA_QUERIES = ("student", "teacher")
LR_SCALING_BATCH = 256
"""Linear scaling rule (Goyal et al. 2017, as in DINO): peak lr = lr * global_batch / 256."""
MIN_LR_FRACTION = 0.02
"""Default final lr of the cosine decay as a fraction of the peak."""


def _check(ok: bool, name: str, want: str, value) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {want}, got {value!r}")


@dataclass
class ModelConfig:
    preset: str = "B"
    """Model size: tiny (F=12), B (48), L (96), H (192); sets feature_size unless that is given."""
    feature_size: int = 0
    """SwinUNETR feature size F (channels of the first stage), a multiple of 12; 0 = from preset."""
    use_v2: bool = False
    """SwinUNETR-v2 (residual conv blocks per stage), as MONAI's `use_v2`."""
    checkpoint_activations: bool = False
    """Recompute the backbone's Swin blocks in the backward pass (less memory, ~30-40% more time)."""
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
    casa: bool = True
    """CASA aligns the patch tokens (on); off: the patch term compares the student's and the
    teacher's encoder tokens at the same positions, without the alignment block (an ablation)."""
    casa_views: str = "within"
    """Decoder tokens CASA reads: `within` the query's own view (the official code) or the other
    view, `cross` (the method's README: semantics matched between the views)."""
    casa_queries: str = "teacher"
    """Queries of the target branch: `teacher` (the teacher's unmasked encoder tokens) or `student`
    (the student's masked ones, as the official code). With `student` both branches share queries
    and CASA weights, and on the tiny preset every patch token took one prototype within 7 steps;
    with `teacher` they spread over 2-13 (docs/experiments/2026-12-02-alice-monitors.md)."""

    def __post_init__(self):
        _check(self.preset in PRESET_FEATURE_SIZE, "model.preset", f"one of {sorted(PRESET_FEATURE_SIZE)}",
               self.preset)
        if self.feature_size == 0:
            self.feature_size = PRESET_FEATURE_SIZE[self.preset]
        _check(self.feature_size > 0 and self.feature_size % 12 == 0, "model.feature_size",
               "a positive multiple of 12 (SwinUNETR heads)", self.feature_size)
        for name in ("out_dim", "patch_out_dim", "head_hidden_dim", "head_bottleneck_dim", "casa_heads",
                     "casa_ffn_dim"):
            _check(getattr(self, name) > 0, f"model.{name}", "positive", getattr(self, name))
        _check(self.casa_views in CASA_VIEWS, "model.casa_views", f"one of {', '.join(CASA_VIEWS)}", self.casa_views)
        _check(self.casa_queries in CASA_QUERIES, "model.casa_queries", f"one of {', '.join(CASA_QUERIES)}",
               self.casa_queries)


@dataclass
class DataConfig:
    data_dir: str = ""
    """Root the datalist's relative image paths refer to (default: the datalist's folder)."""
    json_list: str = ""
    """Decathlon JSON datalist (`training`, `validation`); required."""
    cache_dir: str = ""
    """Preprocessed cache written by `alice-ds preprocess` (int16 .npy per case); required."""
    embed_dir: str | None = None
    """SAM embeddings (`alice-ds embed`); unset = intra-case pairs only (no SAM matching)."""
    spacing: tuple[float, float, float] | None = None
    """Voxel spacing of the cache in mm (x, y, z); unset = read from the cache (recorded for the
    export); given, it must match the cache."""
    num_workers: int = 4
    """DataLoader worker processes per rank."""
    overfit_one_batch: bool = False
    """Repeat the first batch forever (debugging: the loss must fall)."""

    def __post_init__(self):
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
            _check(len(self.spacing) == 3 and min(self.spacing) > 0, "data.spacing", "three positive mm values",
                   self.spacing)
        _check(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Base learning rate; the peak is lr * global_batch / 256 (linear scaling; DINO's base lr). At
    8 GPUs x 8 the peak is 1.25e-4, whose cosine mean ~6e-5 is what the reference effectively ran;
    the tiny preset's 0.064 (peak 5e-4 at a global batch of 2) was the best of an lr sweep on it
    (docs/experiments/2026-12-02-alice-monitors.md)."""
    min_lr: float | None = None
    """Final lr of the cosine decay, below the peak; unset = 0.02 x the peak."""
    warmup_steps: int = 1000
    """Linear lr warmup from 0 to the peak, in optimizer steps."""
    weight_decay: float = 0.04
    """Weight decay at step 0 (cosine to weight_decay_end); never on biases and norms."""
    weight_decay_end: float = 0.4
    """Weight decay at the last step."""
    momentum_start: float = 0.996
    """Teacher EMA momentum at step 0 (cosine to momentum_end)."""
    momentum_end: float = 1.0
    """Teacher EMA momentum at the last step."""
    freeze_last_layer_steps: int = 1000
    """The heads' weight-normalised last layers get lr 0 for this many steps (DINO stability trick)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        _check(self.lr > 0, "optim.lr", "positive", self.lr)
        _check(self.min_lr is None or self.min_lr >= 0, "optim.min_lr", ">= 0", self.min_lr)
        for name in ("warmup_steps", "freeze_last_layer_steps", "weight_decay", "weight_decay_end"):
            _check(getattr(self, name) >= 0, f"optim.{name}", ">= 0", getattr(self, name))
        for name in ("momentum_start", "momentum_end"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"optim.{name}", "in [0, 1]", getattr(self, name))
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optim.betas", "two values in [0, 1)",
               self.betas)


@dataclass
class LossConfig:
    student_temp: float = STUDENT_TEMP
    """Student softmax temperature of both cross-entropies."""
    teacher_temp: float = TEACHER_TEMP
    """cls teacher temperature after the warmup (reference: 0.01)."""
    warmup_teacher_temp: float = WARMUP_TEACHER_TEMP
    """cls teacher temperature at step 0."""
    teacher_patch_temp: float = TEACHER_TEMP
    """Patch (CASA) teacher temperature after the warmup."""
    warmup_teacher_patch_temp: float = WARMUP_TEACHER_TEMP
    """Patch teacher temperature at step 0."""
    warmup_teacher_temp_steps: int = WARMUP_TEACHER_TEMP_STEPS
    """Linear warmup of both teacher temperatures, in optimizer steps."""
    center_momentum: float = CENTER_MOMENTUM
    """EMA momentum of the cls and patch centers."""
    lambdas: tuple[float, float, float] = LAMBDAS
    """Weights of (cls, patch, recon) in the total loss."""
    recon_on: str = "masked"
    """Voxels of the reconstruction MSE: `masked` (SimMIM-style) or `all` (the reference code)."""

    def __post_init__(self):
        self.lambdas = tuple(float(v) for v in self.lambdas)
        _check(len(self.lambdas) == 3 and min(self.lambdas) >= 0, "loss.lambdas", "three weights >= 0", self.lambdas)
        _check(self.recon_on in RECON_ON, "loss.recon_on", f"one of {', '.join(RECON_ON)}", self.recon_on)
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "teacher_patch_temp",
                     "warmup_teacher_patch_temp"):
            _check(getattr(self, name) > 0, f"loss.{name}", "positive", getattr(self, name))
        _check(self.warmup_teacher_temp_steps >= 0, "loss.warmup_teacher_temp_steps", ">= 0",
               self.warmup_teacher_temp_steps)
        _check(0.0 <= self.center_momentum <= 1.0, "loss.center_momentum", "in [0, 1]", self.center_momentum)


@dataclass
class RunConfig:
    output_dir: str = ""
    """Run directory: checkpoints/, metrics.jsonl, config.json, monitor/; required."""
    deepspeed_config: str = ""
    """DeepSpeed JSON, e.g. ds_configs/zero2_bf16.json; required."""
    batch_size: int = 2
    """Micro-batch per rank (samples, each a query+anchor pair)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    num_steps: int = 100000
    """Optimizer steps of the whole run (the schedules span them)."""
    save_every: int = 1000
    """Checkpoint every N optimizer steps, and always at the end."""
    keep_last: int = 3
    """Keep the newest K step_<N> checkpoints (0 = all); `best` is never removed."""
    val_every: int = 0
    """Validation loss every N steps on the `validation` split (0 = never); the best -> tag `best`."""
    val_batches: int = 4
    """Micro-batches per rank in one validation pass."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    resume: str | None = None
    """`auto` (the newest checkpoint in output_dir, if any) or a tag such as step_2000."""
    seed: int = 0
    """Seed of model init, sampling and augmentation."""
    max_nonfinite: int = 10
    """Stop with an error after this many consecutive non-finite losses or skipped updates."""
    cudnn_benchmark: bool = True
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest (off for
    bitwise-repeatable GPU runs)."""

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "num_steps", "log_every", "val_batches", "max_nonfinite"):
            _check(getattr(self, name) > 0, f"run.{name}", "positive", getattr(self, name))
        for name in ("save_every", "keep_last", "val_every"):
            _check(getattr(self, name) >= 0, f"run.{name}", ">= 0", getattr(self, name))


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        """Build from a nested dict (YAML preset, `alice_state.json`); unknown sections and keys and
        values of the wrong type are `ConfigError`s naming them."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of sections {list(SECTIONS)}")
        kwargs = {}
        for name, values in d.items():
            if name not in SECTIONS:
                raise ConfigError(f"{source}: unknown section {name!r} (known: {', '.join(SECTIONS)})")
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping of fields, got {values!r}")
            hints = section_fields(name)
            for key in values:
                if key not in hints:
                    home = [s for s in SECTIONS if key in section_fields(s)]
                    where = f" (it belongs to section {home[0]!r})" if home else ""
                    raise ConfigError(f"{source}: unknown key {key!r} in section {name!r}{where}")
            kwargs[name] = SECTIONS[name](**{k: _coerce(f"{name}.{k}", hints[k], v) for k, v in values.items()})
        return cls(**kwargs)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "sampler": SamplerConfig,
                             "optim": OptimConfig, "loss": LossConfig, "run": RunConfig}


def section_fields(section: str) -> dict[str, object]:
    """Field name -> resolved type annotation of one section."""
    return typing.get_type_hints(SECTIONS[section])


def _coerce(name: str, hint, value):
    """`value` as the field's type (an int where a float is wanted, a list where a tuple is), or a
    `ConfigError` naming the field: a YAML typo must not become a traceback inside the trainer."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name} must be set, got null")
    if type(None) in args:  # X | None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"{name}: no coercion for type {hint}")


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Samples per optimizer step over all ranks."""
    return cfg.run.batch_size * cfg.run.grad_accum * world_size


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """lr * global_batch / 256 (the linear scaling rule)."""
    return cfg.optim.lr * global_batch(cfg, world_size) / LR_SCALING_BATCH


def resolve(cfg: TrainConfig, world_size: int, on_gpu: bool, cache_spacing: tuple[float, float, float]) -> TrainConfig:
    """The config a run actually uses, derived once and without changing `cfg`:
    - `optim.min_lr`: MIN_LR_FRACTION of the peak when unset; a given one must be below the peak
      (the reference code's "decay" rose);
    - `sampler.augment_on`: `auto` -> `device` on a GPU, `worker` on the CPU;
    - `data.spacing`: the cache's (a given one must equal it; the export records it)."""
    out = TrainConfig.from_dict(cfg.to_dict())
    peak = peak_lr(cfg, world_size)
    if cfg.optim.min_lr is None:
        out.optim.min_lr = MIN_LR_FRACTION * peak
    elif cfg.optim.min_lr >= peak:
        raise ConfigError(f"optim.min_lr {cfg.optim.min_lr:g} must be below the peak lr {peak:g} (= lr "
                          f"{cfg.optim.lr:g} * global batch {global_batch(cfg, world_size)} / {LR_SCALING_BATCH}); "
                          "lower --min_lr or raise --lr")
    if cfg.sampler.augment_on == "auto":
        out.sampler.augment_on = "device" if on_gpu else "worker"
    spacing = tuple(float(s) for s in cache_spacing)
    if cfg.data.spacing is not None and tuple(cfg.data.spacing) != spacing:
        raise ConfigError(f"data.spacing {cfg.data.spacing} differs from the cache's {spacing} ({cfg.data.cache_dir})")
    out.data.spacing = spacing
    return out
