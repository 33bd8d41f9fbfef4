"""Synthetic abdominal/thoracic CT phantoms: the built-in dataset and the test fixture.

The anatomy is defined once in an *atlas frame* (mm, RAS+ as in nibabel: x grows towards the
patient's Right, y towards Anterior, z towards Superior; z = 0 at the lower pelvis, the spine on the
posterior midline). Each subject maps world mm to atlas mm with a per-axis scale, a translation and
a smooth random deformation made of sums of 1D sinusoids (separable, so evaluating it over a voxel
grid costs three broadcasts, and it can be inverted by fixed-point iteration for the landmarks).
Structures are evaluated only inside their conservative voxel bounding box and full-grid steps run
in slabs, so a 256x256x150 case takes about 0.6 s of CPU (a 512x512x195 one about 5 s).

Between subjects: body size, fat thickness, organ position/size, smooth deformation, contrast phase,
noise, voxel spacing, z field of view (cases cover different, partly overlapping body ranges) and the
storage orientation (RAS, LPS or LAS, with the matching affine).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


from alice_ds.files import atomic_path

LABELS: dict[str, int] = {
    "liver": 1, "kidney_right": 2, "spleen": 3, "aorta": 4, "ivc": 5, "stomach": 6,
    "kidney_left": 7, "lung_right": 8, "lung_left": 9, "heart": 10, "vertebrae": 11, "ribs": 12,
    "pelvis": 13, "bladder": 14, "bowel": 15, "gallbladder": 16, "airway": 17,
}
"""Organ label values in `labelsTr/*.nii.gz` (0 = background / unlabeled tissue)."""

ATLAS_Z_TOP = 660.0
"""Top of the modelled body range in atlas mm (lung apices); 0 is the lower pelvis."""

AIR_HU = -1000.0
_HU_RANGE = (-1024.0, 3071.0)
"""Range of 12-bit CT values as scanners store them."""

# Vertebral levels, bottom to top: (name, atlas z of the body centre in mm). Lumbar levels are 36 mm
# apart, thoracic 27 mm (adult averages); S1-S2 are fused (no discs).
_LEVEL_NAMES = ["S2", "S1", "L5", "L4", "L3", "L2", "L1"] + [f"T{i}" for i in range(12, 0, -1)]
_LEVEL_Z = np.array([86.0, 116.0, 150.0, 186.0, 222.0, 258.0, 294.0]
                    + [326.0 + 27.0 * i for i in range(12)])
_LEVEL_RADIUS = np.array([15.0, 19.0, 23.0, 23.0, 22.0, 21.0, 20.0]
                         + list(np.linspace(19.0, 14.0, 12)))
_LEVEL_Y = np.array([-60.0, -52.0] + [-43.0] * 17)
"""Vertebral body centre y (mm); the sacrum tilts posteriorly."""
_FUSED_LEVELS = 2
_BODY_HEIGHT_FRACTION = 0.76
"""Fraction of the level spacing taken by the vertebral body; the rest is the disc."""
_THORACIC_STEP = 27.0
_T12_INDEX = _LEVEL_NAMES.index("T12")

# Lean body outline (atlas z -> semi-axes in mm; subcutaneous fat is added on top): wide pelvis,
# abdomen, chest narrowing to the apex. The back is deeper than the front (the spine sits posterior).
_BODY_Z = np.array([0.0, 100.0, 200.0, 300.0, 400.0, 480.0, 560.0, 660.0])
_BODY_RX = np.array([150.0, 150.0, 134.0, 130.0, 132.0, 134.0, 132.0, 116.0])
_BODY_RY = np.array([92.0, 95.0, 92.0, 92.0, 98.0, 104.0, 100.0, 88.0])
_BACK_DEPTH_RATIO = 1.25
_BACK_MUSCLE_MM = 30.0
"""Extra muscle in the posterior wall (erector spinae, quadratus lumborum), tapering to 0 laterally."""
_SKIN_MM = 2.0
_SPINOUS_MM = 20.0

# Aorta centre line (atlas z -> x, y) from the bifurcation to the arch, and its radius.
_AORTA_Z = np.array([190.0, 300.0, 420.0, 480.0, 575.0])
_AORTA_X = np.array([-10.0, -12.0, -18.0, -28.0, -30.0])
_AORTA_Y = np.array([-6.0, -7.0, -14.0, -26.0, -28.0])
_AORTA_R = np.array([9.0, 10.5, 11.5, 12.0, 12.5])
_IVC = dict(x=24.0, y=-6.0, r=11.0, z0=180.0, z1=485.0)
_ILIAC_END = dict(x=58.0, y=0.0, z=95.0, r=6.0)
_CARINA = np.array([0.0, -14.0, 575.0])
_TRACHEA_R, _BRONCHUS_R, _AIRWAY_WALL_MM = 9.0, 6.0, 2.0
_BRONCHUS_END = dict(x=45.0, z=540.0)
"""Main bronchi run from the carina to (+-x, carina y, z), into the lung hila."""

# Contrast phases: HU of the blood pool and of enhancing organs.
PHASES: dict[str, dict[str, float]] = {
    "non_contrast": dict(aorta=42, ivc=40, heart_blood=42, liver=58, spleen=48, kidney_cortex=32,
                         kidney_medulla=30),
    "arterial": dict(aorta=290, ivc=70, heart_blood=260, liver=72, spleen=125, kidney_cortex=185,
                     kidney_medulla=75),
    "portal_venous": dict(aorta=165, ivc=150, heart_blood=150, liver=112, spleen=118,
                          kidney_cortex=165, kidney_medulla=150),
}
TISSUE_HU = dict(skin=35, subcutaneous_fat=-105, muscle=52, visceral_fat=-92, lung=-855,
                 myocardium=85, bile=8, urine=10, stomach_wall=45, stomach_fluid=15, gas=-950,
                 bowel_wall=45, bowel_content=22, cortical_bone=750, cancellous_bone=230,
                 rib=480, disc=90, csf=12, pelvis_bone=420)


@dataclass(frozen=True)
class Profile:
    """Acquisition ranges of one dataset flavour (all in mm unless noted)."""

    matrix: int
    """In-plane voxels per axis."""
    inplane_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    noise_hu: tuple[float, float]
    """Standard deviation of the (in-plane correlated) noise in HU; coarser voxels average it down."""


FULL = Profile(matrix=512, inplane_mm=(0.7, 0.9), slice_mm=(1.5, 5.0), noise_hu=(10.0, 28.0))
SMALL = Profile(matrix=128, inplane_mm=(2.8, 3.4), slice_mm=(4.0, 6.0), noise_hu=(4.0, 10.0))
"""Fast test cases: same anatomy in mm, ~3 mm in-plane voxels (the in-plane FOV stays 360-435 mm)."""

_ORIENTATIONS = ("RAS", "LPS", "RAS", "LAS")
"""Storage orientation by case index: every dataset of 2+ cases has non-RAS files."""


def _smooth_fn(rng: np.random.Generator, amplitude: float, wavelengths: tuple[float, float],
               modes: int = 3):
    """A random smooth 1D function (mm -> mm), |f| <= amplitude; sum of `modes` sinusoids."""
    lam = rng.uniform(*wavelengths, modes)
    phase = rng.uniform(0.0, 2 * math.pi, modes)
    amp = rng.normal(size=modes)
    amp *= amplitude / np.abs(amp).sum()

    def f(t):
        t = np.asarray(t, dtype=np.float64)
        return sum(a * np.sin(2 * math.pi * t / wl + p) for a, wl, p in zip(amp, lam, phase))

    return f


@dataclass
class _Organ:
    """An ellipsoid organ in atlas mm (centre and semi-axes already varied for this subject)."""

    center: np.ndarray
    radii: np.ndarray

    def lo(self):
        return self.center - self.radii

    def hi(self):
        return self.center + self.radii


@dataclass
class Subject:
    """Everything random about one phantom case (drawn from the case's own generator)."""

    scale: np.ndarray            # world mm per atlas mm, per axis
    origin: np.ndarray           # world mm of the atlas origin
    fat_mm: float
    muscle_mm: float
    phase: str
    noise_hu: float
    spacing: np.ndarray          # voxel size (mm) x, y, z
    shape: tuple[int, int, int]
    grid_origin: np.ndarray      # world mm of voxel (0, 0, 0) in the RAS generation grid
    z_range: tuple[float, float]  # atlas z covered by the field of view
    orientation: str
    deform: dict = field(default_factory=dict)
    organs: dict = field(default_factory=dict)
    hu_jitter: float = 1.0

    def world_to_atlas(self, points) -> np.ndarray:
        """World mm `[P, 3]` -> atlas mm `[P, 3]`: the subject map (per-axis scale and translation plus
        the smooth deformation; each organ's own shift and size are not part of it). `_Grid` evaluates the same map in
        its separable form over a voxel grid; `_Grid.atlas_to_world` inverts it."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        d, (ox, oy, oz), (sx, sy, sz) = self.deform, self.origin, self.scale
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        return np.stack([(x - ox) / sx + d["xx"](x) + d["xy"](y) + d["xz"](z),
                         (y - oy) / sy + d["yx"](x) + d["yy"](y) + d["yz"](z),
                         (z - oz) / sz + d["zz"](z)], axis=1)


_DEFORM = {
    "xx": (4.0, (150.0, 500.0)), "xy": (4.0, (150.0, 500.0)), "xz": (7.0, (200.0, 600.0)),
    "yx": (4.0, (150.0, 500.0)), "yy": (4.0, (150.0, 500.0)), "yz": (8.0, (200.0, 600.0)),
    "zz": (8.0, (250.0, 600.0)),
}
"""Smooth deformation terms: key "ab" = displacement of atlas axis a as a function of world axis b,
(max amplitude mm, wavelength range mm). Each term's slope is at most 2*pi*amp/min_wavelength
<= 0.25, which keeps the z map monotonic and the whole map invertible."""


def _draw_subject(rng: np.random.Generator, profile: Profile, index: int) -> Subject:
    s_xy = rng.uniform(0.86, 1.10)
    scale = np.array([s_xy * rng.uniform(0.97, 1.03), s_xy * rng.uniform(0.95, 1.05), rng.uniform(0.9, 1.1)])
    # Field of view along z: a 260-400 mm (atlas) slab anywhere in the body range.
    length = rng.uniform(260.0, 400.0)
    z0 = rng.uniform(0.0, ATLAS_Z_TOP - length)
    inplane = rng.uniform(*profile.inplane_mm)
    dz = rng.uniform(*profile.slice_mm)
    spacing = np.array([inplane, inplane, dz])
    nz = int(math.ceil(length * scale[2] / dz))
    shape = (profile.matrix, profile.matrix, nz)
    # World frame: scanner coordinates with the table centre near x = y = 0 and an arbitrary z.
    origin = np.array([rng.normal(0.0, 8.0), rng.normal(-10.0, 8.0), rng.uniform(-900.0, -300.0)])
    fov = spacing * (np.array(shape) - 1)
    grid_origin = np.array([-fov[0] / 2, -fov[1] / 2, origin[2] + z0 * scale[2]])
    deform = {key: _smooth_fn(rng, amp, wl) for key, (amp, wl) in _DEFORM.items()}
    deform["bound"] = {axis: sum(amp for key, (amp, _) in _DEFORM.items() if key[0] == axis) for axis in "xyz"}
    organs = {}
    for name, (c, r) in _ORGANS.items():
        organs[name] = _Organ(np.array(c) + np.clip(rng.normal(0.0, 4.5, 3), -9, 9),
                              np.array(r) * rng.uniform(0.88, 1.12, 3))
    lo, hi = profile.noise_hu
    return Subject(scale=scale, origin=origin, fat_mm=rng.uniform(8.0, 35.0), muscle_mm=rng.uniform(9.0, 15.0),
                   phase=str(rng.choice(list(PHASES))), noise_hu=rng.uniform(lo, hi), spacing=spacing,
                   shape=shape, grid_origin=grid_origin, z_range=(z0, z0 + length),
                   orientation=_ORIENTATIONS[index % len(_ORIENTATIONS)], deform=deform, organs=organs,
                   hu_jitter=rng.uniform(0.92, 1.08))


_LIVER_TAPER = (0.75, 0.25)
"""Liver cross-section scale = a + b * u along its x axis (u = -1 at the left lobe tip, 1 at the right)."""

# Ellipsoid organs: atlas centre (x, y, z) and semi-axes (mm).
_ORGANS = {
    "liver": ((52.0, 5.0, 420.0), (84.0, 80.0, 72.0)),
    "gallbladder": ((42.0, 58.0, 372.0), (15.0, 15.0, 28.0)),
    "spleen": ((-88.0, -35.0, 425.0), (24.0, 45.0, 50.0)),
    "kidney_right": ((72.0, -42.0, 268.0), (27.0, 24.0, 55.0)),
    "kidney_left": ((-72.0, -42.0, 284.0), (27.0, 24.0, 55.0)),
    "stomach": ((-48.0, 38.0, 428.0), (42.0, 32.0, 48.0)),
    "bladder": ((0.0, 55.0, 58.0), (40.0, 32.0, 30.0)),
    "heart": ((-15.0, 35.0, 532.0), (55.0, 45.0, 48.0)),
}


class _Grid:
    """World <-> atlas mapping of one subject on its RAS voxel grid (separable 1D terms)."""

    def __init__(self, sub: Subject):
        self.sub = sub
        d = sub.deform
        self.axes = [sub.grid_origin[a] + sub.spacing[a] * np.arange(sub.shape[a]) for a in range(3)]
        x, y, z = self.axes
        sx, sy, sz = sub.scale
        ox, oy, oz = sub.origin
        # q_x = (x - ox)/sx + f_xx(x) + f_xy(y) + f_xz(z); likewise q_y; q_z depends on z only.
        self.qx_terms = ((x - ox) / sx + d["xx"](x), d["xy"](y), d["xz"](z))
        self.qy_terms = (d["yx"](x), (y - oy) / sy + d["yy"](y), d["yz"](z))
        self.qz = (z - oz) / sz + d["zz"](z)

    def box(self, lo, hi):
        """Voxel slices that surely contain every voxel whose atlas point lies in [lo, hi]."""
        sub, b = self.sub, self.sub.deform["bound"]
        out = []
        for a, key in enumerate("xy"):
            w_lo = sub.origin[a] + sub.scale[a] * (lo[a] - b[key])
            w_hi = sub.origin[a] + sub.scale[a] * (hi[a] + b[key])
            i0 = int(math.floor((w_lo - sub.grid_origin[a]) / sub.spacing[a]))
            i1 = int(math.ceil((w_hi - sub.grid_origin[a]) / sub.spacing[a])) + 1
            out.append(slice(max(i0, 0), max(min(i1, sub.shape[a]), 0)))
        k0 = int(np.searchsorted(self.qz, lo[2], side="left"))
        k1 = int(np.searchsorted(self.qz, hi[2], side="right"))
        out.append(slice(max(k0 - 1, 0), min(k1 + 1, sub.shape[2])))
        return tuple(out)

    def q(self, sl):
        """Atlas coordinates over a box: QX, QY `[nx, ny, nz]` float32 and QZ `[1, 1, nz]`."""
        sx, sy, sz = sl
        a, b, c = self.qx_terms
        qx = (a[sx, None, None] + b[None, sy, None] + c[None, None, sz]).astype(np.float32)
        a, b, c = self.qy_terms
        qy = (a[sx, None, None] + b[None, sy, None] + c[None, None, sz]).astype(np.float32)
        qz = self.qz[sz].astype(np.float32)[None, None, :]
        return qx, qy, qz

    def q_at(self, idx):
        """Atlas coordinates `[N]` x3 at voxel index arrays `idx = (i, j, k)`."""
        i, j, k = idx
        a, b, c = self.qx_terms
        qx = a[i] + b[j] + c[k]
        a, b, c = self.qy_terms
        qy = a[i] + b[j] + c[k]
        return qx, qy, self.qz[k]

    def atlas_to_world(self, q) -> np.ndarray:
        """Invert the subject map for atlas points `[P, 3]` -> world mm `[P, 3]` by fixed-point
        iteration: the step contracts by scale x summed slopes of an axis' terms < 0.7, so 40
        iterations leave an error far below a micrometre."""
        sub, d = self.sub, self.sub.deform
        q = np.asarray(q, dtype=np.float64).reshape(-1, 3)
        p = sub.origin + sub.scale * q
        for _ in range(40):
            x, y, z = p[:, 0], p[:, 1], p[:, 2]
            p = np.stack([
                sub.origin[0] + sub.scale[0] * (q[:, 0] - d["xx"](x) - d["xy"](y) - d["xz"](z)),
                sub.origin[1] + sub.scale[1] * (q[:, 1] - d["yx"](x) - d["yy"](y) - d["yz"](z)),
                sub.origin[2] + sub.scale[2] * (q[:, 2] - d["zz"](z)),
            ], axis=1)
        return p


@dataclass
class PhantomCase:
    """One generated case in its *storage* orientation (the affine maps voxels to RAS world mm)."""

    case_id: str
    image: np.ndarray      # int16 HU [X, Y, Z]
    label: np.ndarray      # uint8 [X, Y, Z], values of LABELS
    affine: np.ndarray     # 4x4 float64
    landmarks: dict        # name -> [x, y, z] world mm (inside the field of view only)
    info: dict


class _Painter:
    def __init__(self, grid: _Grid):
        self.grid = grid
        shape = grid.sub.shape
        self.hu = np.full(shape, AIR_HU, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)
        self.body = np.zeros(shape, dtype=bool)
        self.cavity = np.zeros(shape, dtype=bool)
        """Free body cavity: filled by organs, then bowel and lungs."""
        self.h = np.zeros(shape, dtype=np.float32)
        """Atlas mm inside the cavity boundary (negative in the body wall)."""

    def put(self, sl, mask, hu, label=None):
        h = self.hu[sl]
        h[mask] = hu if np.isscalar(hu) else hu[mask]
        if label is not None:
            self.label[sl][mask] = label


def _ellipsoid(q, organ: _Organ):
    qx, qy, qz = q
    c, r = organ.center, organ.radii
    return ((qx - c[0]) / r[0]) ** 2 + ((qy - c[1]) / r[1]) ** 2 + ((qz - c[2]) / r[2]) ** 2


def _dome(qx, qy):
    """Atlas z of the diaphragm under each lung: domes peaking at 495 mm (right) and 480 mm (left),
    lower towards the sides and the back (posterior costophrenic recesses)."""
    right = 495.0 - 50.0 * ((qx - 60.0) / 90.0) ** 2 - 40.0 * (qy / 90.0) ** 2
    left = 480.0 - 50.0 * ((qx + 60.0) / 90.0) ** 2 - 40.0 * (qy / 90.0) ** 2
    return np.where(qx > 0, right, left)


def _render(sub: Subject, rng: np.random.Generator):
    grid = _Grid(sub)
    pt = _Painter(grid)
    phase = {k: v * sub.hu_jitter for k, v in PHASES[sub.phase].items()}
    T = TISSUE_HU
    full = tuple(slice(0, n) for n in sub.shape)

    # Body wall: skin, subcutaneous fat, muscle (thicker at the back); inside it the cavity is
    # visceral fat until organs fill it. Depth below the skin is approximated from the ellipse radius.
    # Done in slabs of x so that the full-grid temporaries stay small.
    for sl in _slabs(full):
        _body_wall(grid, pt, sl)

    # Paraspinal muscles (whole spine) and psoas (lumbar, widening caudally).
    sl = grid.box((-70, -115, 40), (70, -20, ATLAS_Z_TOP))
    qx, qy, qz = grid.q(sl)
    para = ((np.abs(qx) - 36.0) / 22.0) ** 2 + ((qy + 82.0) / 17.0) ** 2 < 1.0
    psoas_r = np.clip(np.interp(qz, [130.0, 300.0], [22.0, 7.0]), 0, None) * (qz < 305)
    psoas = (np.abs(qx) - 42.0) ** 2 + (qy + 35.0) ** 2 < psoas_r ** 2
    muscles = (para | psoas) & pt.body[sl]
    pt.put(sl, muscles, T["muscle"])
    pt.cavity[sl][muscles] = False

    def organ_box(name, pad=0.0):
        o = sub.organs[name]
        s = grid.box(o.lo() - pad, o.hi() + pad)
        return s, grid.q(s), o

    # Liver (below the right dome): a wedge, thick on the right, thinning into the left lobe.
    sl, q, o = organ_box("liver")
    u = (q[0] - o.center[0]) / o.radii[0]                                   # -1 left tip .. 1 right edge
    taper = np.clip(_LIVER_TAPER[0] + _LIVER_TAPER[1] * u, 0.3, 1.0)
    e = u ** 2 + (((q[1] - o.center[1]) / o.radii[1]) ** 2 + ((q[2] - o.center[2]) / o.radii[2]) ** 2) / taper ** 2
    m = (e < 1) & (q[2] < _dome(q[0], q[1]) - 4) & pt.cavity[sl]
    pt.put(sl, m, phase["liver"], LABELS["liver"])
    sl, q, o = organ_box("gallbladder")
    pt.put(sl, (_ellipsoid(q, o) < 1) & pt.cavity[sl], T["bile"], LABELS["gallbladder"])
    # Spleen (below the left dome).
    sl, q, o = organ_box("spleen")
    m = (_ellipsoid(q, o) < 1) & (q[2] < _dome(q[0], q[1]) - 4) & pt.cavity[sl]
    pt.put(sl, m, phase["spleen"], LABELS["spleen"])
    # Kidneys: enhancing cortex around the medulla (cortico-medullary contrast in the arterial phase).
    for side in ("right", "left"):
        sl, q, o = organ_box(f"kidney_{side}")
        e = _ellipsoid(q, o)
        m = (e < 1) & pt.cavity[sl]
        pt.put(sl, m, phase["kidney_cortex"], LABELS[f"kidney_{side}"])
        pt.put(sl, m & (e < 0.55), phase["kidney_medulla"])
        medial = (q[0] - o.center[0]) * np.sign(o.center[0]) < 0
        hilum = m & (e < 0.3) & medial & (np.abs(q[2] - o.center[2]) < 0.5 * o.radii[2])
        pt.put(sl, hilum, TISSUE_HU["visceral_fat"])                        # renal sinus fat
    # Stomach: wall, fluid, and gas rising anteriorly (the patient is supine).
    sl, q, o = organ_box("stomach")
    e = _ellipsoid(q, o)
    m = (e < 1) & (q[2] < _dome(q[0], q[1]) - 4) & pt.cavity[sl]
    pt.put(sl, m, T["stomach_wall"], LABELS["stomach"])
    lumen = m & (e < 0.8)
    pt.put(sl, lumen, T["stomach_fluid"])
    pt.put(sl, lumen & (q[1] > o.center[1] + 0.3 * o.radii[1]), T["gas"])
    # Bladder.
    sl, q, o = organ_box("bladder")
    e = _ellipsoid(q, o)
    m = (e < 1) & pt.cavity[sl]
    pt.put(sl, m, T["stomach_wall"], LABELS["bladder"])
    pt.put(sl, m & (e < 0.8), T["urine"])
    # Heart: myocardium around the blood pool.
    sl, q, o = organ_box("heart")
    e = _ellipsoid(q, o)
    m = (e < 1) & pt.cavity[sl]
    pt.put(sl, m, T["myocardium"], LABELS["heart"])
    pt.put(sl, m & (e < 0.6), phase["heart_blood"])

    _vessels(grid, pt, phase)
    _bowel(grid, pt, rng)
    _lungs(grid, pt)
    _airway(grid, pt)
    _spine(grid, pt)
    _ribs(grid, pt, sub)
    _pelvis(grid, pt, sub)
    _organ_texture(grid, pt, rng)

    return grid, _add_noise(pt, sub, rng), pt.label


_SLAB = 32
"""Rows of x processed at once by the full-grid steps (memory: a few 10 MB per temporary)."""


def _slabs(sl):
    """Split a box into slabs of `_SLAB` rows along x."""
    for x0 in range(sl[0].start, sl[0].stop, _SLAB):
        yield (slice(x0, min(x0 + _SLAB, sl[0].stop)),) + tuple(sl[1:])


def _body_wall(grid: _Grid, pt: _Painter, sl) -> None:
    sub, T = grid.sub, TISSUE_HU
    qx, qy, qz = grid.q(sl)
    fat = np.float32(sub.fat_mm)
    rx = (np.interp(qz, _BODY_Z, _BODY_RX) + fat).astype(np.float32)             # [1, 1, nz]
    ry = np.interp(qz, _BODY_Z, _BODY_RY).astype(np.float32)
    ry_here = np.where(qy < 0, ry * np.float32(_BACK_DEPTH_RATIO) + fat, ry + fat)
    qx /= rx
    qx *= qx
    qy /= ry_here                                                                # signed y / radius
    depth = np.sqrt(qx + qy * qy)                                                # normalised radius r
    np.subtract(1.0, depth, out=depth)
    ry_here += rx
    ry_here *= np.float32(0.5)
    depth *= ry_here                                                             # (1 - r) * mean radius
    back = qy                                                                    # extra posterior muscle
    np.negative(back, out=back)
    back -= np.float32(0.2)
    np.clip(back, 0.0, 0.8, out=back)
    back *= np.float32(_BACK_MUSCLE_MM / 0.8)
    body = depth > 0
    hu = pt.hu[sl]
    hu[body] = T["skin"]
    hu[depth > _SKIN_MM] = T["subcutaneous_fat"]
    h = depth - (fat + np.float32(sub.muscle_mm)) - back
    hu[(depth > fat) & (h <= 0)] = T["muscle"]
    cavity = h > 0
    hu[cavity] = T["visceral_fat"]
    pt.body[sl], pt.h[sl], pt.cavity[sl] = body, h, cavity


def _add_noise(pt: _Painter, sub: Subject, rng: np.random.Generator) -> np.ndarray:
    """Add CT-like noise and return the int16 image. The noise is correlated in-plane: white noise
    summed over 2x2 neighbours (std x2, hence the 0.5), drawn slab by slab."""
    image = np.empty(sub.shape, dtype=np.int16)
    for x0 in range(0, sub.shape[0], _SLAB):
        sl = slice(x0, min(x0 + _SLAB, sub.shape[0]))
        noise = rng.standard_normal(pt.hu[sl].shape, dtype=np.float32)
        noise[1:] += noise[:-1]
        noise[:, 1:] += noise[:, :-1]
        noise *= np.float32(0.5 * sub.noise_hu)
        noise += pt.hu[sl]
        np.rint(noise, out=noise)
        np.clip(noise, *_HU_RANGE, out=noise)
        image[sl] = noise
    return image


def _tube(qx, qy, cx, cy, r):
    return (qx - cx) ** 2 + (qy - cy) ** 2 < r ** 2


def _vessels(grid: _Grid, pt: _Painter, phase: dict) -> None:
    # Aorta along its centre line (x, y, r interpolated per slice), capped at the arch.
    sl = grid.box((-60, -70, _AORTA_Z[0]), (20, 10, _AORTA_Z[-1]))
    qx, qy, qz = grid.q(sl)
    inside = (qz >= _AORTA_Z[0]) & (qz <= _AORTA_Z[-1])
    m = _tube(qx, qy, np.interp(qz, _AORTA_Z, _AORTA_X), np.interp(qz, _AORTA_Z, _AORTA_Y),
              np.interp(qz, _AORTA_Z, _AORTA_R)) & inside
    pt.put(sl, m & pt.body[sl], phase["aorta"], LABELS["aorta"])
    # Common iliac arteries from the bifurcation to the pelvis.
    e = _ILIAC_END
    sl = grid.box((-e["x"] - 15, -40, e["z"]), (e["x"] + 15, 10, _AORTA_Z[0]))
    qx, qy, qz = grid.q(sl)
    t = np.clip((_AORTA_Z[0] - qz) / (_AORTA_Z[0] - e["z"]), 0, 1)
    inside = (qz >= e["z"]) & (qz <= _AORTA_Z[0])
    for sign in (-1.0, 1.0):
        cx = _AORTA_X[0] + t * (sign * e["x"] - _AORTA_X[0])
        cy = _AORTA_Y[0] + t * (e["y"] - _AORTA_Y[0])
        pt.put(sl, _tube(qx, qy, cx, cy, e["r"]) & inside & pt.body[sl], phase["aorta"], LABELS["aorta"])
    # Renal arteries (aorta -> medial side of each kidney, at the kidney's centre z; the right one
    # passes behind the IVC) and the celiac trunk (anterior, at the celiac level): they mark the
    # aortic landmarks along an otherwise uniform tube.
    r = _BRANCH_R
    for side in ("right", "left"):
        k = grid.sub.organs[f"kidney_{side}"]
        z = k.center[2]
        a = np.array([np.interp(z, _AORTA_Z, _AORTA_X), np.interp(z, _AORTA_Z, _AORTA_Y), z])
        end = np.array([k.center[0] - np.sign(k.center[0]) * 0.5 * k.radii[0], k.center[1], z])
        lo, hi = np.minimum(a, end) - r, np.maximum(a, end) + r
        sl = grid.box(lo, hi)
        qx, qy, qz = grid.q(sl)
        t = (qx - a[0]) / (end[0] - a[0])                                  # 0 at the aorta, 1 at the hilum
        m = ((qy - (a[1] + t * (end[1] - a[1]))) ** 2 + (qz - z) ** 2 < r ** 2) & (t >= 0) & (t <= 1)
        pt.put(sl, m & pt.body[sl], phase["aorta"], LABELS["aorta"])
    a = np.array([np.interp(_CELIAC_Z, _AORTA_Z, _AORTA_X), np.interp(_CELIAC_Z, _AORTA_Z, _AORTA_Y), _CELIAC_Z])
    sl = grid.box(a - [r, 0, r], a + [r, _CELIAC_LEN_MM, r])
    qx, qy, qz = grid.q(sl)
    m = ((qx - a[0]) ** 2 + (qz - a[2]) ** 2 < r ** 2) & (qy >= a[1]) & (qy <= a[1] + _CELIAC_LEN_MM)
    pt.put(sl, m & pt.body[sl], phase["aorta"], LABELS["aorta"])
    # Inferior vena cava, right of the aorta, up into the right atrium.
    v = _IVC
    sl = grid.box((v["x"] - v["r"], v["y"] - v["r"], v["z0"]), (v["x"] + v["r"], v["y"] + v["r"], v["z1"]))
    qx, qy, qz = grid.q(sl)
    m = _tube(qx, qy, v["x"], v["y"], v["r"]) & (qz >= v["z0"]) & (qz <= v["z1"]) & pt.body[sl]
    pt.put(sl, m, phase["ivc"], LABELS["ivc"])


_BRANCH_R = 3.5
_CELIAC_Z, _CELIAC_LEN_MM = 410.0, 28.0
"""Atlas z of the celiac trunk and how far it runs anteriorly from the aortic centre line."""

_TEXTURE_GRID_MM = 8.0
"""Spacing of the random fields behind organ texture and liver vessels (features of ~15-25 mm)."""
_TEXTURE_HU = 6.0
"""Standard deviation of the smooth parenchymal texture of liver, spleen and kidneys."""
_TEXTURED = ("liver", "spleen", "kidney_right", "kidney_left")
_LIVER_VESSEL_WIDTH = 0.18
"""Liver vessels: where two smooth unit-variance fields are both within +-this of 0 (tubes ~3-5 mm)."""
_LIVER_VESSEL_HU = {"non_contrast": -12.0, "arterial": 15.0, "portal_venous": 55.0}
"""Vessel contrast against the parenchyma per phase (portal and hepatic veins light up in the
portal venous phase)."""


def _organ_texture(grid: _Grid, pt: _Painter, rng: np.random.Generator) -> None:
    """Mild smooth texture in solid organs and a vessel tree in the liver, from random fields in
    atlas mm (so both scale with the subject and look the same at every resolution)."""
    from scipy import ndimage

    for name in _TEXTURED:
        o = grid.sub.organs[name]
        lo, hi = o.lo() - _TEXTURE_GRID_MM, o.hi() + _TEXTURE_GRID_MM
        dims = tuple(np.ceil((hi - lo) / _TEXTURE_GRID_MM).astype(int) + 2)
        fields = []
        for _ in range(3 if name == "liver" else 1):
            f = ndimage.gaussian_filter(rng.standard_normal(dims), 1.0)
            fields.append(f / f.std())
        for sl in _slabs(grid.box(lo, hi)):
            idx = np.nonzero(pt.label[sl] == LABELS[name])
            if idx[0].size == 0:
                continue
            q = grid.q_at(tuple(i + s.start for i, s in zip(idx, sl)))
            coords = np.stack([(q[a] - lo[a]) / _TEXTURE_GRID_MM for a in range(3)])   # [3, N] field units
            values = [ndimage.map_coordinates(f, coords, order=1, mode="nearest") for f in fields]
            hu = pt.hu[sl]
            add = _TEXTURE_HU * values[0]
            if name == "liver":
                vessel = (np.abs(values[1]) < _LIVER_VESSEL_WIDTH) & (np.abs(values[2]) < _LIVER_VESSEL_WIDTH)
                add = add + vessel * _LIVER_VESSEL_HU[grid.sub.phase]
            hu[idx] += add.astype(np.float32)


_BOWEL_Z = (40.0, 365.0)
_BOWEL_GRID_MM = 9.0
"""Spacing of the random field whose level sets form the bowel loops (loops are ~15-25 mm wide)."""


def _bowel(grid: _Grid, pt: _Painter, rng: np.random.Generator) -> None:
    """Small bowel and colon: the unfilled abdominal cavity becomes loops (wall, fluid, gas) and
    mesenteric fat, drawn from a smooth random field in atlas mm (so it scales with the subject)."""
    from scipy import ndimage

    lo = np.array([-170.0, -60.0, _BOWEL_Z[0]])
    dims = np.ceil((np.array([170.0, 130.0, _BOWEL_Z[1]]) - lo) / _BOWEL_GRID_MM).astype(int) + 2
    fields = []
    for sigma in (1.0, 1.5):  # loops, and where they hold gas
        f = ndimage.gaussian_filter(rng.standard_normal(tuple(dims)), sigma)
        fields.append(f / f.std())
    for sl in _slabs(grid.box(lo, (170, 130, _BOWEL_Z[1]))):
        _bowel_slab(grid, pt, sl, lo, fields)


def _bowel_slab(grid: _Grid, pt: _Painter, sl, lo, fields) -> None:
    from scipy import ndimage

    qz = grid.q(sl)[2]
    free = pt.cavity[sl] & (pt.label[sl] == 0) & (qz >= _BOWEL_Z[0]) & (qz <= _BOWEL_Z[1])
    idx = np.nonzero(free)
    if idx[0].size == 0:
        return
    qx, qy, qz = grid.q_at(tuple(i + s.start for i, s in zip(idx, sl)))
    keep = qy > -60.0  # loops stay anterior to the kidneys and the spine
    coords = np.stack([(qx - lo[0]), (qy - lo[1]), (qz - lo[2])]) / _BOWEL_GRID_MM   # [3, N] field grid units
    loop, gas = (ndimage.map_coordinates(f, coords, order=1, mode="nearest") for f in fields)
    wall = keep & (np.abs(loop - 0.2) < 0.18)
    lumen = keep & (loop > 0.2) & ~wall
    hu = pt.hu[sl]
    lab = pt.label[sl]
    sel = tuple(i[wall] for i in idx)
    hu[sel] = TISSUE_HU["bowel_wall"]
    lab[sel] = LABELS["bowel"]
    sel = tuple(i[lumen] for i in idx)
    hu[sel] = np.where(gas[lumen] > 0.6, TISSUE_HU["gas"], TISSUE_HU["bowel_content"])
    lab[sel] = LABELS["bowel"]


def _lungs(grid: _Grid, pt: _Painter) -> None:
    """Lungs fill the free thoracic cavity above the diaphragm, except the mediastinum."""
    for sl in _slabs(grid.box((-170, -130, 370), (170, 130, ATLAS_Z_TOP))):
        _lungs_slab(grid, pt, sl)


def _lungs_slab(grid: _Grid, pt: _Painter, sl) -> None:
    qx, qy, qz = grid.q(sl)
    mediastinum = (np.abs(qx + 8.0) < 32.0) & (qy > -75.0)
    paravertebral = (np.abs(qx) < 30.0) & (qy < -15.0)
    m = pt.cavity[sl] & (pt.label[sl] == 0) & (qz > _dome(qx, qy)) & ~mediastinum & ~paravertebral
    pt.put(sl, m & (qx > 0), TISSUE_HU["lung"], LABELS["lung_right"])
    pt.put(sl, m & (qx <= 0), TISSUE_HU["lung"], LABELS["lung_left"])


def _airway(grid: _Grid, pt: _Painter) -> None:
    """Trachea above the carina and the two main bronchi: air tubes with a soft-tissue wall, the
    landmark of the upper chest."""
    c, r = _CARINA, _TRACHEA_R + _AIRWAY_WALL_MM
    sl = grid.box((c[0] - r, c[1] - r, c[2]), (c[0] + r, c[1] + r, ATLAS_Z_TOP))
    qx, qy, qz = grid.q(sl)
    d2 = (qx - c[0]) ** 2 + (qy - c[1]) ** 2
    above = (qz >= c[2] - _TRACHEA_R) & pt.body[sl]
    pt.put(sl, above & (d2 < r ** 2), TISSUE_HU["stomach_wall"], LABELS["airway"])
    pt.put(sl, above & (d2 < _TRACHEA_R ** 2), TISSUE_HU["gas"])
    e = _BRONCHUS_END
    r = _BRONCHUS_R + _AIRWAY_WALL_MM
    sl = grid.box((-e["x"] - r, c[1] - r, e["z"]), (e["x"] + r, c[1] + r, c[2]))
    qx, qy, qz = grid.q(sl)
    t = np.clip((c[2] - qz) / (c[2] - e["z"]), 0, 1)                        # 0 at the carina
    inside = (qz >= e["z"]) & (qz <= c[2]) & pt.body[sl]
    for sign in (-1.0, 1.0):
        d2 = (qx - sign * e["x"] * t) ** 2 + (qy - c[1]) ** 2
        pt.put(sl, inside & (d2 < r ** 2), TISSUE_HU["stomach_wall"], LABELS["airway"])
        pt.put(sl, inside & (d2 < _BRONCHUS_R ** 2), TISSUE_HU["gas"])


def _spine(grid: _Grid, pt: _Painter) -> None:
    """Vertebral bodies (cortical shell, cancellous core), discs, posterior arch, spinous and
    transverse processes, and the canal. Levels differ in radius and spacing along z, so the spine is
    a ruler that tells the level of every slice."""
    T = TISSUE_HU
    sl = grid.box((-75, -135, 0), (75, -10, ATLAS_Z_TOP))
    qx, qy, qz = grid.q(sl)
    z = qz[0, 0]
    lvl = np.abs(z[:, None] - _LEVEL_Z[None, :]).argmin(axis=1)        # nearest level per slice
    dz = (z - _LEVEL_Z[lvl])[None, None, :]
    step = np.where(lvl < _T12_INDEX, 36.0, _THORACIC_STEP)[None, None, :]
    rad = _LEVEL_RADIUS[lvl][None, None, :]
    yc = _LEVEL_Y[lvl][None, None, :]
    in_range = ((z > _LEVEL_Z[0] - 20) & (z < _LEVEL_Z[-1] + 15))[None, None, :]
    fused = (lvl < _FUSED_LEVELS)[None, None, :]
    half = _BODY_HEIGHT_FRACTION * step / 2
    rr = np.sqrt(qx ** 2 + (qy - yc) ** 2)
    disc = in_range & (rr < rad) & (np.abs(dz) >= half) & ~fused
    vbody = in_range & (rr < rad) & ((np.abs(dz) < half) | fused)
    shell = vbody & ((rr > rad - 2.5) | (np.abs(dz) > half - 2.0) & ~fused)
    canal_r = np.where(lvl < _T12_INDEX, 10.0, 8.0)[None, None, :]
    cy = yc - rad - canal_r + 1.0
    rc = np.sqrt(qx ** 2 + (qy - cy) ** 2)
    arch = in_range & (rc >= canal_r) & (rc < canal_r + 6.0) & (qy < yc - rad + 2) & (np.abs(dz) < 0.42 * step)
    spinous = in_range & (np.abs(qx) < 4.0) & (qy < cy - canal_r) & (qy > cy - canal_r - _SPINOUS_MM) \
        & (np.abs(dz + 0.12 * step) < 0.3 * step)
    tp_len = np.where(lvl < _T12_INDEX, 45.0, 30.0)[None, None, :]
    transverse = in_range & (np.abs(qy - cy) < 5.0) & (np.abs(qx) > canal_r) & (np.abs(qx) < tp_len) \
        & (np.abs(dz) < 6.0)
    inside = pt.body[sl]
    pt.put(sl, disc & inside, T["disc"], 0)
    bone = (vbody | arch | spinous | transverse) & inside
    pt.put(sl, bone, T["cancellous_bone"], LABELS["vertebrae"])
    pt.put(sl, (shell | arch | spinous | transverse) & inside, T["cortical_bone"])
    canal = in_range & (rc < canal_r) & inside
    pt.put(sl, canal, T["csf"], 0)


_RIB_RADIUS_MM = 5.0
_RIB_DROP_MM = 55.0
"""How far a rib descends from its vertebra to its anterior end (atlas mm)."""
_RIB_REACH = np.array([1.5, 1.6, 2.2, 2.3, 2.4, 2.6, 2.6, 2.6, 2.6, 2.5, 2.4, 2.3])
"""Angular reach of each rib from the posterior midline (radians; pi = anterior midline), T12 first:
floating ribs are short, true ribs reach close to the sternum."""


def _ribs(grid: _Grid, pt: _Painter, sub: Subject) -> None:
    rib_h = -0.5 * sub.muscle_mm                                            # inside the chest wall
    for sl in _slabs(grid.box((-170, -130, _LEVEL_Z[_T12_INDEX] - _RIB_DROP_MM - 10), (170, 130, ATLAS_Z_TOP))):
        _ribs_slab(grid, pt, sl, rib_h)
    # Sternum: an anterior midline bar over the upper chest.
    sl = grid.box((-20, 60, 470), (20, 130, ATLAS_Z_TOP))
    qx, qy, qz = grid.q(sl)
    m = (np.abs(qx) < 14.0) & (np.abs(pt.h[sl] - rib_h) < 5.0) & (qz > 470) & (qz < 640)
    pt.put(sl, m, TISSUE_HU["rib"], LABELS["ribs"])


def _ribs_slab(grid: _Grid, pt: _Painter, sl, rib_h: float) -> None:
    """Ribs: circles of radius 5 mm around a centre line in the chest wall that starts at each
    thoracic vertebra and descends anteriorly; evaluated only on the ring of wall voxels."""
    ring = np.abs(pt.h[sl] - rib_h) < _RIB_RADIUS_MM
    idx = np.nonzero(ring)
    if idx[0].size == 0:
        return
    qx, qy, qz = grid.q_at(tuple(i + s.start for i, s in zip(idx, sl)))
    phi = np.abs(np.arctan2(qx, -qy))                                       # 0 = posterior midline
    u = qz + _RIB_DROP_MM * phi / math.pi
    k = np.clip(np.rint((u - _LEVEL_Z[_T12_INDEX]) / _THORACIC_STEP), 0, 11).astype(int)
    dz = u - (_LEVEL_Z[_T12_INDEX] + _THORACIC_STEP * k)
    dr = pt.h[sl][idx] - rib_h
    rib = (dz ** 2 + dr ** 2 < _RIB_RADIUS_MM ** 2) & (phi > 0.3) & (phi < _RIB_REACH[k])
    sel = tuple(i[rib] for i in idx)
    pt.hu[sl][sel] = TISSUE_HU["rib"]
    pt.label[sl][sel] = LABELS["ribs"]


_FEMUR_HEADS = {"femoral_head_right": (88.0, -8.0, 40.0), "femoral_head_left": (-88.0, -8.0, 40.0)}
_FEMUR_RADIUS = 23.0


def _pelvis(grid: _Grid, pt: _Painter, sub: Subject) -> None:
    """Iliac wings (curved plates flaring from the sacrum) and the femoral heads."""
    sl = grid.box((-170, -130, 90), (170, 60, 215))
    qx, qy, qz = grid.q(sl)
    phi = np.abs(np.arctan2(qx, -qy))
    plate_h = 18.0
    crest = 205.0 - 25.0 * (phi - 1.1) ** 2
    m = (np.abs(pt.h[sl] - plate_h) < 4.0) & (phi > 0.45) & (phi < 1.75) & (qz > 100) & (qz < crest)
    pt.put(sl, m, TISSUE_HU["pelvis_bone"], LABELS["pelvis"])
    for c in _FEMUR_HEADS.values():
        c = np.array(c)
        sl = grid.box(c - _FEMUR_RADIUS, c + _FEMUR_RADIUS)
        qx, qy, qz = grid.q(sl)
        rr = np.sqrt((qx - c[0]) ** 2 + (qy - c[1]) ** 2 + (qz - c[2]) ** 2)
        pt.put(sl, (rr < _FEMUR_RADIUS) & pt.body[sl], TISSUE_HU["cancellous_bone"], LABELS["pelvis"])
        pt.put(sl, (rr < _FEMUR_RADIUS) & (rr > _FEMUR_RADIUS - 3) & pt.body[sl], TISSUE_HU["cortical_bone"])


def _atlas_landmarks(sub: Subject) -> dict[str, np.ndarray]:
    """Named landmarks in atlas mm (subject variation of organs included)."""
    o = sub.organs
    lm = {f"{n}_centroid": o[n].center for n in ("liver", "spleen", "kidney_right", "kidney_left",
                                                   "stomach", "bladder", "heart", "gallbladder")}
    for side in ("right", "left"):
        k = o[f"kidney_{side}"]
        lm[f"kidney_{side}_upper_pole"] = k.center + [0, 0, 0.75 * k.radii[2]]
        lm[f"kidney_{side}_lower_pole"] = k.center - [0, 0, 0.75 * k.radii[2]]
    # aorta_renal: the left renal artery origin (the left kidney sits higher).
    for name, z in (("aorta_bifurcation", _AORTA_Z[0] + 8), ("aorta_renal", o["kidney_left"].center[2]),
                    ("aorta_celiac", _CELIAC_Z), ("aorta_thoracic", 530.0)):
        lm[name] = np.array([np.interp(z, _AORTA_Z, _AORTA_X), np.interp(z, _AORTA_Z, _AORTA_Y), z])
    for name, z, y in zip(_LEVEL_NAMES, _LEVEL_Z, _LEVEL_Y):
        lm[f"vertebra_{name}"] = np.array([0.0, y, z])
    lm.update({k: np.array(v) for k, v in _FEMUR_HEADS.items()})
    lm["carina"] = _CARINA + [0.0, 0.0, 3.0]
    return lm


LANDMARK_LABELS = {
    **{f"{n}_centroid": n for n in ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "bladder",
                                    "heart", "gallbladder")},
    **{f"kidney_{s}_{p}_pole": f"kidney_{s}" for s in ("right", "left") for p in ("upper", "lower")},
    **{f"aorta_{n}": "aorta" for n in ("bifurcation", "renal", "celiac", "thoracic")},
    **{f"vertebra_{n}": "vertebrae" for n in _LEVEL_NAMES},
    **{k: "pelvis" for k in _FEMUR_HEADS},
    "carina": "airway",
}
"""Landmark name -> the LABELS organ it lies in."""

_LANDMARK_MARGIN_MM = 3.0


def _to_storage(image, label, grid: _Grid, orientation: str):
    """Flip the RAS grid into the storage orientation; returns arrays and the 4x4 affine."""
    sub = grid.sub
    affine = np.diag([*sub.spacing, 1.0])
    affine[:3, 3] = sub.grid_origin
    for axis, code in enumerate(orientation[:2]):
        if code in "LP":                         # RAS axis 0 stored as L, axis 1 as P
            image = np.flip(image, axis)
            label = np.flip(label, axis)
            affine[:3, 3] += affine[:3, axis] * (sub.shape[axis] - 1)
            affine[:3, axis] *= -1
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def _subject_and_rng(index: int, seed: int, small: bool) -> tuple[Subject, np.random.Generator]:
    """Case `index`'s generator (seeded by (seed, index)) and the Subject it draws first; rendering
    goes on with the same generator."""
    rng = np.random.default_rng([seed, index])
    return _draw_subject(rng, SMALL if small else FULL, index), rng


def draw_subject(index: int, seed: int = 0, small: bool = False) -> Subject:
    """The Subject of case `index` of the dataset with `seed`, without rendering it: its
    `world_to_atlas` is the case's exact anatomical frame (used by
    `alice_ds.data.oracle.write_atlas_oracle_embedding`)."""
    return _subject_and_rng(index, seed, small)[0]


LANDMARK_DECIMALS = 3
"""Landmark files store mm rounded to this many decimals."""
_REDRAW_TOLERANCE_MM = 0.01
"""A redrawn subject's landmarks must agree with the file's this well (20x the rounding)."""


def subject_for_landmarks(landmark_file) -> Subject:
    """The Subject of a phantom case from its landmark file (`info.generator`: seed, index, small),
    checked against the file: every landmark within _REDRAW_TOLERANCE_MM and the info's shape and
    spacing. Raises DataError naming the file when it is no phantom landmark file or when the redrawn
    case differs (another generator version, or a case written with a `shape` override)."""
    from alice_ds.errors import DataError
    from alice_ds.sam.evaluate import read_landmark_file

    path = Path(landmark_file)
    _, marks = read_landmark_file(path)
    try:
        info = json.loads(path.read_text())["info"]
        gen = info["generator"]
        seed, index, small = gen["seed"], gen["index"], gen["small"]
        shape, spacing = tuple(info["shape"]), np.asarray(info["spacing"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(path, f"not a phantom landmark file: no info.generator {{seed, index, small}}, "
                              f"info.shape, info.spacing ({e!r})") from None
    if not (type(seed) is int and type(index) is int and type(small) is bool):
        raise DataError(path, f"info.generator must hold an int seed and index and a bool small, got {gen}")
    sub = draw_subject(index, seed, small)
    if shape != tuple(sub.shape) or not np.allclose(spacing, sub.spacing, atol=1e-3):
        raise DataError(path, f"info shape {list(shape)} / spacing {spacing.tolist()} differ from the redrawn "
                              f"phantom {gen}: {list(sub.shape)} / {np.round(sub.spacing, 4).tolist()}")
    atlas = _atlas_landmarks(sub)
    names = [n for n in atlas if n in marks]
    if not names:
        raise DataError(path, f"none of its landmarks is a phantom landmark ({sorted(marks)[:5]} ...)")
    world = _Grid(sub).atlas_to_world(np.stack([atlas[n] for n in names]))  # [L, 3]
    err = float(np.abs(world - np.asarray([marks[n] for n in names])).max())
    if not err <= _REDRAW_TOLERANCE_MM:
        raise DataError(path, f"landmarks differ from the redrawn phantom {gen} by up to {err:.2f} mm "
                              "(written by another generator version?)")
    return sub


def generate_case(index: int, seed: int = 0, small: bool = False, shape: tuple[int, int, int] | None = None
                  ) -> PhantomCase:
    """Case number `index` (1-based) of the dataset with `seed`. Deterministic: the case draws from
    its own generator seeded by (seed, index). `shape` overrides the matrix (keeping the field of
    view, so the voxel size changes); used for timing."""
    sub, rng = _subject_and_rng(index, seed, small)
    if shape is not None:
        fov = sub.spacing * np.array(sub.shape)
        sub.shape = tuple(int(s) for s in shape)
        sub.spacing = fov / np.array(sub.shape)
        sub.grid_origin[:2] = -sub.spacing[:2] * (np.array(sub.shape[:2]) - 1) / 2
    grid, image, label = _render(sub, rng)
    image, label, affine = _to_storage(image, label, grid, sub.orientation)
    names = list(_atlas_landmarks(sub))
    world = grid.atlas_to_world(np.stack(list(_atlas_landmarks(sub).values())))
    lo = sub.grid_origin + _LANDMARK_MARGIN_MM
    hi = sub.grid_origin + sub.spacing * (np.array(sub.shape) - 1) - _LANDMARK_MARGIN_MM
    landmarks = {n: [round(float(v), LANDMARK_DECIMALS) for v in p] for n, p in zip(names, world)
                 if (p >= lo).all() and (p <= hi).all()}
    info = dict(phase=sub.phase, orientation=sub.orientation, spacing=[round(float(s), 4) for s in sub.spacing],
                shape=list(sub.shape), atlas_z_range=[round(v, 1) for v in sub.z_range],
                noise_hu=round(float(sub.noise_hu), 2), scale=[round(float(s), 4) for s in sub.scale],
                generator=dict(seed=int(seed), index=int(index), small=bool(small)))
    return PhantomCase(f"Case_{index:05d}", image, label, affine, landmarks, info)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def write_case(case: PhantomCase, out_dir) -> None:
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "landmarks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _save_nifti(case.image, case.affine, out / "imagesTr" / f"{case.case_id}_0000.nii.gz")
    _save_nifti(case.label, case.affine, out / "labelsTr" / f"{case.case_id}.nii.gz")
    (out / "landmarks" / f"{case.case_id}.json").write_text(json.dumps(
        {"case_id": case.case_id, "frame": "RAS world mm", "landmarks": case.landmarks, "info": case.info},
        indent=1))


def write_dataset(out_dir, num: int, seed: int = 0, small: bool = False, on_case=None) -> list[str]:
    """Write `num` phantom cases in the FLARE layout plus a decathlon `dataset.json`; returns the
    case ids (`Case_00001`, ...). `on_case(case)` is called after each case is written (progress)."""
    from alice_ds.data import case_id_from_path, case_key
    from alice_ds.data.datalist import build_datalist, write_datalist

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out = Path(out_dir)
    ids = []
    for i in range(1, num + 1):
        case = generate_case(i, seed=seed, small=small)
        write_case(case, out)
        ids.append(case.case_id)
        if on_case is not None:
            on_case(case)
    datalist = build_datalist(out, val_fraction=0.0, seed=seed)
    # only this run's cases (a folder reused with a smaller --num keeps older files on disk)
    written = set(ids)
    datalist["training"] = [e for e in datalist["training"] if case_key(case_id_from_path(e["image"])) in written]
    datalist.update(name="alice-ds phantom", description=f"synthetic abdominal/thoracic CT, seed {seed}",
                    labels={str(v): k for k, v in LABELS.items()}, numTraining=len(datalist["training"]))
    write_datalist(datalist, out / "dataset.json")
    return ids
