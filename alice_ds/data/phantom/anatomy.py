"""The atlas anatomy: label values, contrast phases and tissue HU, vertebral levels, the body
outline, vessels, airway and organ tables, in atlas mm (frame: see the package docstring).

Subjects vary these (`subject.py`); the painters (`render.py`, `viscera.py`, `skeleton.py`) and the
landmarks (`landmarks.py`) read them.
"""

from __future__ import annotations

import numpy as np

LABELS: dict[str, int] = {
    "liver": 1, "kidney_right": 2, "spleen": 3, "aorta": 4, "ivc": 5, "stomach": 6,
    "kidney_left": 7, "lung_right": 8, "lung_left": 9, "heart": 10, "vertebrae": 11, "ribs": 12,
    "pelvis": 13, "bladder": 14, "bowel": 15, "gallbladder": 16, "airway": 17,
}
"""Organ label values in `labelsTr/*.nii.gz` (0 = background / unlabeled tissue)."""

ATLAS_Z_TOP = 660.0
"""Top of the modelled body range in atlas mm (lung apices); 0 is the lower pelvis."""
PHANTOM_AIR_HU = -1000.0
"""HU the renderer paints air with (outside the body). Not `alice_ds.data.cache.AIR_HU` (-1024), the
padding value of cached crops."""
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
_BRANCH_R = 3.5
_CELIAC_Z, _CELIAC_LEN_MM = 410.0, 28.0
"""Atlas z of the celiac trunk and how far it runs anteriorly from the aortic centre line."""

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

_FEMUR_HEADS = {"femoral_head_right": (88.0, -8.0, 40.0), "femoral_head_left": (-88.0, -8.0, 40.0)}
_FEMUR_RADIUS = 23.0


def _dome(qx, qy):
    """Atlas z of the diaphragm under each lung: domes peaking at 495 mm (right) and 480 mm (left),
    lower towards the sides and the back (posterior costophrenic recesses)."""
    right = 495.0 - 50.0 * ((qx - 60.0) / 90.0) ** 2 - 40.0 * (qy / 90.0) ** 2
    left = 480.0 - 50.0 * ((qx + 60.0) / 90.0) ** 2 - 40.0 * (qy / 90.0) ** 2
    return np.where(qx > 0, right, left)
