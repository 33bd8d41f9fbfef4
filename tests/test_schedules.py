"""Schedules are pure functions of the step; the lr checks the reference code lacked."""

import math

import pytest

from alice_ds.engine.schedules import Schedules, cosine


def _sched(**kw):
    base = dict(total_steps=100, peak_lr=1e-3, min_lr=1e-5, warmup_steps=10, weight_decay=0.04,
                weight_decay_end=0.4, momentum_start=0.996, momentum_end=1.0, freeze_last_layer_steps=5)
    base.update(kw)
    return Schedules(**base)


def test_lr_warmup_then_cosine_reaches_min():
    s = _sched()
    assert s.at(0).lr == 0.0
    assert s.at(5).lr == pytest.approx(0.5e-3, rel=1e-12)
    assert s.at(10).lr == pytest.approx(1e-3, rel=1e-12)
    # half-way through the decay the cosine sits at the mean of peak and min
    assert s.at(55).lr == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)
    assert s.at(100).lr == pytest.approx(1e-5, rel=1e-12)
    assert s.at(1000).lr == pytest.approx(1e-5, rel=1e-12)
    lrs = [s.at(i).lr for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the decay must never rise"


def test_wd_momentum_and_freeze():
    s = _sched()
    assert s.at(0).weight_decay == pytest.approx(0.04)
    assert s.at(100).weight_decay == pytest.approx(0.4)
    assert s.at(50).weight_decay == pytest.approx(0.22)
    assert s.at(0).momentum == pytest.approx(0.996)
    assert s.at(100).momentum == pytest.approx(1.0)
    assert s.at(25).momentum == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)
    assert [s.at(i).freeze_last_layer for i in range(7)] == [True] * 5 + [False] * 2


def test_min_lr_above_peak_is_an_error():
    with pytest.raises(ValueError, match="min_lr 0.01 must be below the peak lr 0.001"):
        _sched(min_lr=1e-2)


def test_cosine_without_decay_steps():
    assert cosine(3, 1.0, 0.5, total_steps=3, warmup_steps=3) == 0.5
