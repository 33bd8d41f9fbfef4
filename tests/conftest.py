"""Test-wide settings. Environment first: TRITON_INTERPRET must be set before any kernel is defined,
DS_ACCELERATOR before deepspeed is imported."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ALICE_DS_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- Data fixtures (alice_ds.data: phantom -> datalist -> cache), shared by every module's tests ----
import pytest  # noqa: E402

PHANTOM_CASES = 4
PHANTOM_CACHE_SPACING = (3.0, 3.0, 3.0)
"""Coarse enough that the whole fixture chain takes seconds; the anatomy is the same in mm."""


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Four small phantom cases (FLARE layout, seed 0): imagesTr/, labelsTr/, landmarks/, dataset.json.
    Case 2 and 4 are stored RAS, case 1 LPS, case 3 LAS."""
    from alice_ds.data.phantom import write_dataset

    out = tmp_path_factory.mktemp("phantom")
    write_dataset(out, num=PHANTOM_CASES, seed=0, small=True)
    return out


@pytest.fixture(scope="session")
def phantom_datalist(phantom_dir):
    """Path of a decathlon datalist of the phantom cases (3 training, 1 validation), relative to
    `phantom_dir`."""
    from alice_ds.data.datalist import build_datalist, write_datalist

    return write_datalist(build_datalist(phantom_dir, val_fraction=0.25, seed=0),
                          phantom_dir.parent / f"{phantom_dir.name}_datalist.json")


@pytest.fixture(scope="session")
def phantom_cache(phantom_dir, phantom_datalist, tmp_path_factory):
    """Preprocessed cache of the phantom cases at 3 mm isotropic (ids `Case_0000N_0000`)."""
    from alice_ds.data.preprocess import preprocess_dataset

    cache = tmp_path_factory.mktemp("phantom_cache")
    preprocess_dataset(phantom_dir, phantom_datalist, cache, spacing=PHANTOM_CACHE_SPACING, show=False)
    return cache
# ---- end of data fixtures ----
