"""SAM anatomical embeddings (DESIGN §5): network, self-supervised training, embedding files,
coarse-to-fine matching, landmark evaluation.

This package module holds only the constants its modules share: `network.SAMNet`, `matcher.Matcher`,
`io.open_embedding` / `io.write_embedding` are imported from their modules.
"""

DEFAULT_WINDOW = 20
"""Fine-search window edge in fine voxels (4 mm each at stride 2 of the 2 mm grid): 80 mm, more than
two coarse voxels (32 mm at coarse stride 16), so a coarse argmax one coarse voxel off is recovered."""

DEFAULT_CANDIDATES = 5
"""Coarse voxels whose fine windows the window search scores (the best coarse voxels, each at least
two coarse voxels from the others): the match is the best (fine + coarse) / 2 over all of their
windows. 1 is a single coarse argmax (the reference SAM searches globally instead). On the held-out phantoms of
docs/experiments/2026-11-26-sam-coarse-half-tries.md (two learned models, 422 landmark matches) 5
candidates gave 34.2 and 28.6 mm median (29 and 34 % within 10 mm)
against 61.8 and 47.2 mm (20 and 26 %) with one; 10 gave 30.1 and 27.8 mm."""

DEFAULT_CONTEXT = 8
"""Template of the global search: the query point and its six neighbours this many fine voxels
(32 mm) away along each axis, each compared with the key voxel at the same offset. One vector alone
is ambiguous inside homogeneous tissue and along the repeated vertebrae; the template's reach is what
tells such places apart. On the held-out phantoms a CT matched into a crop of itself lands 1.5 / 4.6 mm
from the truth (median / p95; 97.4 % within 6 mm) with 8, 1.5 / 5.9 mm with 6 and 1.5 / 23.9 mm with 4,
at the same cost (docs/experiments/2026-12-03-sam-embed-edge-padding.md); across subjects, 4 took
landmarks from 30.6 to 46.4 % within 10 mm (docs/experiments/2026-12-02-sam-matching-and-pair-precision.md)."""

SAM_HU_WINDOW = (-1000.0, 1000.0)
"""Default SAMNet input window: HU clipped to it and mapped linearly to [-1, 1]. Wide, so air, fat,
soft tissue and bone all stay distinguishable; a model can be trained on another (`sam-train
--hu_window`, stored in its config): on the phantoms a soft-tissue window (-200, 300) made the fine
half much better (docs/experiments/2026-11-26-sam-which-half-fails.md)."""

SEARCH_MODES = ("window", "global", "coarse")
"""Matcher searches: fine window around the coarse argmax (DESIGN §5), every fine voxel, or the
coarse argmax alone (a diagnostic: where the coarse half points)."""
