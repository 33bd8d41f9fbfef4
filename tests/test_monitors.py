"""Collapse warnings from the learning monitors (alice_ds.engine.monitors)."""

import math

from alice_ds.engine.monitors import MonitorWatch

K = 256
HEALTHY = {"patch_distinct": 6.0, "patch_batch_entropy": 1.3, "cls_distinct": 2.0, "cls_kl": 1.0,
           "cls_batch_entropy": 1.5}
PATCH_COLLAPSED = {**HEALTHY, "patch_distinct": 1.0, "patch_batch_entropy": 1e-9}
CLS_COLLAPSED = {**HEALTHY, "cls_distinct": 1.0, "cls_kl": 0.02}
CLS_UNIFORM = {**HEALTHY, "cls_batch_entropy": 0.999 * math.log(K), "cls_kl": 0.002}


def test_a_collapse_is_said_once_after_its_steps_and_when_it_ends():
    watch = MonitorWatch(K)
    said = [watch.check(s, m) for s, m in enumerate([HEALTHY] + [PATCH_COLLAPSED] * 7 + [HEALTHY], start=1)]
    assert [i for i, w in enumerate(said, start=1) if w] == [6, 9]  # 5 collapsed steps (2..6), then it ended
    assert "patch head has collapsed for 5 steps" in said[5][0] and said[5][0].startswith("step 6:")
    assert said[8] == ["step 9: patch collapse ended after 7 steps"]


def test_cls_collapse_needs_ten_steps_and_a_copying_student():
    watch = MonitorWatch(K)
    copying = [watch.check(s, CLS_COLLAPSED) for s in range(1, 11)]
    assert [bool(w) for w in copying] == [False] * 9 + [True] and "cls head has collapsed" in copying[-1][0]
    watch = MonitorWatch(K)  # one prototype for every sample, but the student does not match it: no warning
    assert not any(watch.check(s, {**CLS_COLLAPSED, "cls_kl": 0.5}) for s in range(1, 30))


def test_a_uniform_cls_teacher_is_said_too():
    watch = MonitorWatch(K)
    said = [w for s in range(1, 11) for w in watch.check(s, CLS_UNIFORM)]
    assert len(said) == 1 and said[0].startswith("step 10:") and "uniform" in said[0]
    watch = MonitorWatch(4 * K)  # the same entropy is far from uniform over 4x the prototypes
    assert not any(watch.check(s, CLS_UNIFORM) for s in range(1, 30))
