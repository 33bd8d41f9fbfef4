"""Warnings from the learning monitors of metrics.jsonl (`alice_ds.losses.alice.MONITORS`): a
collapse is said once, when it has lasted `steps` steps in a row, and again when it ends.

Thresholds measured on the tiny preset (2 ranks, 10 full-size phantoms, global batch 2;
docs/experiments/2026-12-02-alice-monitors.md): at initialisation the patch teacher spreads the
tokens of a batch over 5-7 prototypes; in the collapsed runs every token took one prototype with a
batch-mean entropy below 0.1 nats (down to 1e-9) for 20 steps and more. The cls teacher gave every
sample one prototype while the student copied it (`cls_kl` < 0.1); at initialisation `cls_distinct`
is 1 too (a random network maps every crop alike), hence the KL condition and the longer run. With
DINO's teacher temperatures the cls teacher went uniform instead (batch-mean entropy within 1 % of
log K, `cls_kl` 0.002-0.06).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    name: str
    steps: int
    """Consecutive steps the condition must hold before the warning."""
    message: str


RULES = (
    Rule("patch_collapse", 5, "every patch token of the batch takes one teacher prototype (patch_distinct 1, "
                              "patch_batch_entropy < 0.1 nats): the patch head has collapsed"),
    Rule("cls_collapse", 10, "every sample of the batch takes one teacher prototype and the student copies it "
                             "(cls_distinct 1, cls_kl < 0.1): the cls head has collapsed"),
    Rule("cls_uniform", 10, "the cls teacher is uniform over its prototypes (cls_batch_entropy within 1 % of "
                            "log out_dim, cls_kl < 0.1): it gives the student no target"),
)


@dataclass
class MonitorWatch:
    """Feed it every step's metrics; it returns the warnings to print (rank 0). `out_dim`: the cls
    head's prototypes (the uniform rule compares the entropy with log out_dim)."""

    out_dim: int
    rules: tuple[Rule, ...] = RULES
    _run: dict[str, int] = field(default_factory=dict)

    def holds(self, rule: Rule, m: dict) -> bool:
        if rule.name == "patch_collapse":
            return m["patch_distinct"] <= 1.0 and m["patch_batch_entropy"] < 0.1
        if rule.name == "cls_collapse":
            return m["cls_distinct"] <= 1.0 and m["cls_kl"] < 0.1
        if rule.name == "cls_uniform":
            return m["cls_batch_entropy"] > 0.99 * math.log(self.out_dim) and m["cls_kl"] < 0.1
        raise ValueError(f"unknown monitor rule {rule.name!r}")

    def check(self, step: int, metrics: dict) -> list[str]:
        out = []
        for rule in self.rules:
            held = self._run.get(rule.name, 0)
            if self.holds(rule, metrics):
                self._run[rule.name] = held + 1
                if held + 1 == rule.steps:
                    out.append(f"step {step}: {rule.message} for {rule.steps} steps (docs/pretraining.md, Monitors)")
            else:
                self._run[rule.name] = 0
                if held >= rule.steps:
                    out.append(f"step {step}: {rule.name.replace('_', ' ')} ended after {held} steps")
        return out
