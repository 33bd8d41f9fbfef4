"""The pair sampler's knobs: the `sampler` section of a training config (`alice_ds.engine.config`),
also built directly by library users, tests and benchmarks. Sizes are in voxels of the cache grid
unless stated."""

from __future__ import annotations

from dataclasses import dataclass

from alice_ds.data.cache import AIR_HU, BODY_HU, BODY_STRIDE, VIEW_HU_WINDOW
from alice_ds.errors import ConfigError
from alice_ds.models.swin import PATCH_SIZE, SIDE_DIVISOR
from alice_ds.sam import DEFAULT_CANDIDATES

AUGMENT_ON = ("auto", "worker", "device")
PAIRINGS = ("sam", "random", "intra")
FALLBACKS = ("intra", "best", "retry")
RETRY_CALLS = 100
"""Matcher calls of `fallback: retry` before it takes the best match anyway (the reference's bound)."""


@dataclass
class SamplerConfig:
    """How pairs are drawn, matched, cropped, augmented and masked (DESIGN §4 steps 1-3)."""

    roi: int = 96
    """Edge of each cubic view in voxels; a multiple of 32 (SwinUNETR's deepest stride). Reference code: 64."""
    hu_window: tuple[float, float] = VIEW_HU_WINDOW
    """HU mapped to 0 and 1 (clipped); the reference code's abdominal window."""
    body_hu: float = BODY_HU
    """Voxels above this HU are body; query points are drawn among them."""
    pad_hu: float = AIR_HU
    """HU of the padding outside a volume (air)."""
    mask_ratio: float = 0.75
    """Exact fraction of the backbone's patch tokens hidden from the student, per view."""
    mask_block: int = 16
    """Edge of a mask block in voxels; a multiple of the backbone's patch size (2)."""
    pairing: str = "sam"
    """How the anchor view is found: `sam` (the query point's SAM match in another case), `random`
    (a random body point of a random other case) or `intra` (a second augmentation of the query
    crop); the last two are ablations."""
    num_candidates: int = 8
    """Query points of case A scored together in one matcher call; one is chosen uniformly among
    those whose match reaches score_threshold and passes the cycle check (the best-scoring one would
    favour the most matchable anatomy). 8 instead of 32 since the cycle check: on phantoms nearly
    every call still yields a pair, at 1.2-1.5x the pairs/s
    (docs/experiments/2026-12-02-sam-matching-and-pair-precision.md)."""
    score_threshold: float = 0.7
    """Minimum match score, (cos_fine + cos_coarse) / 2, for an inter pair (paper code: 0.7)."""
    fallback: str = "intra"
    """When no candidate passes in 1 + max_retries matcher calls: `intra` (two augmentations of one
    crop of A), `best` (the best-scoring match anyway, as the reference does) or `retry` (new partners
    until one passes, at most 100 calls, then the best match)."""
    cycle_mm: float = 16.0
    """Cycle check: a passing candidate is kept only if its match, matched back from case B into case
    A, lands within this many mm of the query point (fixed-point matching, as in SAMv2); 0 turns it
    off. It costs one more matcher call per sample. On phantoms it took the pairs whose anchor lies
    within 20 mm of the true correspondence from 71 to 92-96 % with a right coarse half, and from 11
    to 22-25 % with today's learned one (docs/experiments/2026-12-02-sam-matching-and-pair-precision.md)."""
    level_prior_mm: float = 8.0
    """With a levels file in the embedding folder (`alice-ds sam-levels`), for case pairs it connects:
    each candidate is searched in one fine window around its prior point (the body level from the
    cases' offsets, x and y from the body outline) and passes only when its match lies within this
    many mm of it; the cycle check is not needed there. 0 ignores the file. On the held-out phantoms
    pair precision went from 30 % (cycle check, 70 % of calls accepted) to 92-96 % at 38-43 % with 8
    and 91-92 % at 54-56 % with 10 (docs/experiments/2026-12-03-sam-body-levels.md)."""
    match_window: int = 8
    """Edge of the matcher's fine-search window in fine voxels (4 mm each): 32 mm. The matcher's
    own default (`alice_ds.sam.DEFAULT_WINDOW`) is wider, for landmark accuracy; here the window's
    volume is what each call costs. On the benchmark phantoms (oracle embeddings, 4 x 3 case pairs x
    32 body points) windows 8 and 20 find the full-volume argmax equally often (87% vs 88%) at 7 vs
    44 CPU-ms per call (window 6: 84%, 6 ms)."""
    match_candidates: int = DEFAULT_CANDIDATES
    """Coarse voxels whose fine windows the matcher searches (1 = the coarse argmax alone)."""
    max_retries: int = 3
    """Extra matcher calls (new partner, new candidates) before falling back to an intra pair."""
    augment: bool = True
    """Rotate, noise and rescale the views (off: none of them, whatever their magnitudes)."""
    rotation: float = 15.0
    """Maximum rotation about each axis in degrees (0 disables)."""
    rotation_prob: float = 1.0
    """Probability that a view is rotated."""
    noise_std: float = 0.1
    """Standard deviation of the Gaussian noise on the [0, 1] scale (0 disables)."""
    intensity_scale: float = 0.0
    """Random intensity scale `v * (1 + f)`, f ~ U(±intensity_scale) (0 disables)."""
    intensity_shift: float = 0.0
    """Random intensity shift `v + o`, o ~ U(±intensity_shift) on the [0, 1] scale (0 disables)."""
    augment_on: str = "auto"
    """Where rotation, noise and intensity are applied: `worker` (the DataLoader worker augments each
    view, ~28 ms of one core per 96^3 view), `device` (the worker only draws the parameters from the
    same generator; the trainer applies them to the batch on its device, one batched grid_sample) or
    `auto` (the trainer picks `device` on a GPU, `worker` on the CPU; a sampler used on its own
    augments in the worker)."""
    body_stride: int = BODY_STRIDE
    """Step of the grid on which a case's body points are listed (read once per worker)."""
    body_points: int = 4096
    """At most this many body points kept per case (a fixed subset), bounding worker memory."""
    samples_per_case: int = 1
    """Samples per query case per epoch."""
    max_bad_fraction: float = 0.1
    """Cases without a usable cache entry or embedding are skipped; above this fraction, an error."""

    def __post_init__(self):
        self.hu_window = tuple(float(v) for v in self.hu_window)
        checks = [
            (self.roi > 0 and self.roi % SIDE_DIVISOR == 0, "roi", f"a positive multiple of {SIDE_DIVISOR}"),
            (len(self.hu_window) == 2 and self.hu_window[1] > self.hu_window[0], "hu_window",
             "[low, high] with low < high"),
            (0.0 <= self.mask_ratio < 1.0, "mask_ratio", "in [0, 1)"),
            (self.mask_block > 0 and self.mask_block % PATCH_SIZE == 0, "mask_block",
             f"a positive multiple of the patch size {PATCH_SIZE}"),
            (self.num_candidates >= 1, "num_candidates", ">= 1"),
            (self.pairing in PAIRINGS, "pairing", f"one of {', '.join(PAIRINGS)}"),
            (self.fallback in FALLBACKS, "fallback", f"one of {', '.join(FALLBACKS)}"),
            (-1.0 <= self.score_threshold <= 1.0, "score_threshold", "in [-1, 1] (a cosine similarity)"),
            (self.cycle_mm >= 0.0, "cycle_mm", ">= 0 mm (0: no cycle check)"),
            (self.level_prior_mm >= 0.0, "level_prior_mm", ">= 0 mm (0: no level prior)"),
            (self.match_window >= 1, "match_window", ">= 1 fine voxel"),
            (self.match_candidates >= 1, "match_candidates", ">= 1"),
            (self.max_retries >= 0, "max_retries", ">= 0"),
            (0.0 <= self.rotation <= 180.0, "rotation", "in [0, 180] degrees"),
            (0.0 <= self.rotation_prob <= 1.0, "rotation_prob", "in [0, 1]"),
            (self.noise_std >= 0.0, "noise_std", ">= 0"),
            (0.0 <= self.intensity_scale < 1.0, "intensity_scale", "in [0, 1)"),
            (self.intensity_shift >= 0.0, "intensity_shift", ">= 0"),
            (self.augment_on in AUGMENT_ON, "augment_on", f"one of {', '.join(AUGMENT_ON)}"),
            (self.body_stride >= 1, "body_stride", ">= 1"),
            (self.body_points >= 1, "body_points", ">= 1"),
            (self.samples_per_case >= 1, "samples_per_case", ">= 1"),
            (0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "in [0, 1]"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ConfigError(f"sampler.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid of one view (where the masks live)."""
        g = self.roi // PATCH_SIZE
        return (g, g, g)

    @property
    def mask_block_tokens(self) -> int:
        """Edge of a mask block in tokens of the patch grid."""
        return self.mask_block // PATCH_SIZE
