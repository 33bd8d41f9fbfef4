"""The tables of benchmarks/pretrain_benefit.py on hand-made results: mean ± sd per arm, and the paired
difference against scratch (same K, same seed) in Dice points."""

from benchmarks.pretrain_benefit import SCRATCH, paired, table


def _runs(*dice):
    return [{"seed": s, "val_dice": d} for s, d in enumerate(dice)]


RESULTS = {
    "alice": {"2": _runs(0.30, 0.10)},
    SCRATCH: {"2": _runs(0.28, 0.05), "4": _runs(0.5, 0.5)},
    "casa_off": {"2": [{"seed": 1, "val_dice": 0.06}]},  # seed 0 missing: paired on seed 1 only
}


def test_mean_and_sd_per_arm():
    header, rows = table(RESULTS, [2, 4], ["alice", SCRATCH])
    assert header == ["arm", "K=2", "K=4"]
    # alice K=2: mean 0.2, sample sd of (0.3, 0.1) = 0.1414
    assert rows == [["alice", "0.200 ± 0.141", "n/a"], [SCRATCH, "0.165 ± 0.163", "0.500 ± 0.000"]]


def test_paired_difference_in_dice_points():
    header, rows = paired(RESULTS, [2, 4], ["alice", SCRATCH, "casa_off"])
    assert header == ["arm - scratch", "K=2", "K=4"]
    # alice - scratch per seed: +2.0 and +5.0 points -> mean +3.5, sd 2.1; scratch itself has no row
    assert rows == [["alice", "+3.5 ± 2.1", "n/a"], ["casa_off", "+1.0", "n/a"]]
