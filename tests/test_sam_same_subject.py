"""Same subject, another field of view (benchmarks/sam_same_subject.py): points of a phantom CT
matched into an LPS-stored copy of it and into a crop of it (same world frame), through the real
preprocess, a SAM trained here on the test phantoms at SAM's 2 mm grid, the real embed and the
Matcher. The right answer is the point itself."""

import pytest

from alice_ds.data.cache import list_cases
from benchmarks import sam_same_subject

STEPS = 120
"""About a minute of training on one core; the 2-step session model is still at its random
initialisation, where no search finds the point."""


@pytest.fixture(scope="module")
def trained_sam(phantom_cache, tmp_path_factory):
    from alice_ds.cli import main

    out = tmp_path_factory.mktemp("sam_same_subject")
    assert main(["sam-train", "--cache_dir", str(phantom_cache), "--output_dir", str(out), "--steps", str(STEPS),
                 "--roi", "48", "--width", "0.125", "--batch_size", "1", "--pairs_per_case", "2",
                 "--temperature", "0.1", "--hu_window", "-200", "300", "--seed", "0", "--workers", "0",
                 "--save_every", str(STEPS)]) == 0
    return out / "sam.safetensors"


@pytest.mark.slow
def test_same_subject_copies(phantom_dir, phantom_cache, trained_sam, tmp_path):
    cases = list_cases(phantom_cache)[:2]  # one stored LPS (the copy is the same cache), one RAS
    res = sam_same_subject.run(phantom_dir, phantom_cache, trained_sam, tmp_path, cases, body_points=32,
                               searches=("window", "global"))
    lps, crop = res["lps"], res["crop"]
    for copy in ("lps", "crop"):
        for search in ("window", "global"):
            print(copy, search, {k: {m: round(v, 2) for m, v in r.items()} for k, r in res[copy][search].items()})
    assert lps["global"]["all"]["n"] >= 60
    # the target for the LPS copy: median <= 3 mm, 95th percentile <= 6 mm
    assert lps["global"]["all"]["median_mm"] <= 3.0 and lps["global"]["all"]["p95_mm"] <= 6.0
    # into the crop: the faces that cut the body replicated 32 mm out before the network (embed.BORDER) and the
    # global search's 32 mm template (DEFAULT_CONTEXT 8): median 2.7 mm, 87 % within 6 mm on this 120-step model
    # (with the 16 mm template 2.9 mm and 77 %; with air at the faces as well 3.7 mm and 62 %). The p95 target
    # (6 mm) is met by the held-out protocol's 700-step model (4.6 mm), not by this one (22 mm)
    # (docs/experiments/2026-12-03-sam-embed-edge-padding.md)
    interior = crop["global"][f">= {sam_same_subject.INTERIOR_MM:g} mm inside the crop"]
    assert interior["n"] >= 30 and interior["median_mm"] <= 3.0
    assert crop["global"]["all"]["median_mm"] <= 3.0 and crop["global"]["all"]["within_6mm"] >= 0.82
    # the window search of the same embeddings is worse on both: the check can tell them apart
    assert lps["window"]["all"]["p95_mm"] > lps["global"]["all"]["p95_mm"]
    assert crop["window"]["all"]["median_mm"] > crop["global"]["all"]["median_mm"]
