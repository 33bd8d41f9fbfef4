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

Modules, in dependency order: `anatomy` (the atlas tables), `subject` (the random draw of a case and
its world <-> atlas map), `painter` (the canvas and shared shape tests), `viscera` and `skeleton`
(structure painters), `render` (one subject -> HU and label volumes), `landmarks` (named atlas
points, redrawing a Subject from a landmark file), `write` (cases and datasets on disk), `cli`
(`alice-ds phantom`).
"""

from alice_ds.data.phantom.anatomy import ATLAS_Z_TOP, LABELS, PHANTOM_AIR_HU, PHASES, TISSUE_HU
from alice_ds.data.phantom.landmarks import (
    ATLAS_FIXED_LANDMARKS,
    LANDMARK_DECIMALS,
    LANDMARK_LABELS,
    subject_for_landmarks,
)
from alice_ds.data.phantom.subject import FULL, SMALL, Profile, Subject, corresponding_points, draw_subject
from alice_ds.data.phantom.write import PhantomCase, generate_case, write_case, write_dataset

__all__ = [
    "ATLAS_FIXED_LANDMARKS", "ATLAS_Z_TOP", "FULL", "LABELS", "LANDMARK_DECIMALS", "LANDMARK_LABELS",
    "PHANTOM_AIR_HU", "PHASES", "SMALL", "TISSUE_HU", "PhantomCase", "Profile", "Subject", "corresponding_points",
    "draw_subject", "generate_case", "subject_for_landmarks", "write_case", "write_dataset",
]
