"""CT data: phantom dataset, datalists, the preprocessed cache (and, later, the pair sampler)."""

import re

_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def case_id_from_path(path) -> str:
    """Case id of an image file: its name without `.nii.gz` / `.nii` (`Case_00001_0000`)."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_key(case_id: str) -> str:
    """Subject key shared by a case's image, label and landmark files: the case id without an
    nnU-Net channel suffix (`Case_00001_0000` -> `Case_00001`)."""
    return _CHANNEL_SUFFIX.sub("", case_id)
