"""Landmark files: named points in world mm, one JSON file per subject (docs/interfaces.md).

`{"case_id": "Case_00001", "landmarks": {"name": [x, y, z], ...}, "info": {...}}`, matched to cases
by case key (the case id without an nnU-Net channel suffix). Phantoms write them
(`alice_ds.data.phantom`); `sam-eval` and the SAM benchmarks read them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alice_ds.data import case_key
from alice_ds.errors import DataError

Landmarks = dict[str, list[float]]
"""name -> [x, y, z] world mm (RAS)."""


def read_landmark_file(path) -> tuple[str, Landmarks]:
    """One landmark file -> (case key, landmarks); a `DataError` naming the file when it is not
    `{"case_id", "landmarks": {name: [x, y, z]}}` with finite numbers."""
    f = Path(path)
    try:
        doc = json.loads(f.read_text())
        marks = {str(k): [float(v) for v in xyz] for k, xyz in doc["landmarks"].items()}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f, f'not a landmark file {{"case_id", "landmarks": {{name: [x, y, z]}}}} ({e})') from None
    bad = [n for n, v in marks.items() if len(v) != 3 or not all(math.isfinite(c) for c in v)]
    if bad:
        raise DataError(f, f"every landmark must be [x, y, z] in finite mm; not so: {bad[:5]}")
    return case_key(str(doc.get("case_id", f.stem))), marks


def read_landmark_folder(directory) -> dict[str, tuple[Path, Landmarks]]:
    """A folder's landmark files, each read once -> {case key: (path, landmarks)} (a later file of
    the same case wins, in name order)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(d, "landmark folder not found")
    out = {}
    for f in sorted(d.glob("*.json")):
        key, marks = read_landmark_file(f)
        out[key] = (f, marks)
    if not out:
        raise DataError(d, "no landmark .json files")
    return out


def load_landmarks(directory) -> dict[str, Landmarks]:
    """Landmark files of a folder -> {case key: landmarks}."""
    return {key: marks for key, (_, marks) in read_landmark_folder(directory).items()}
