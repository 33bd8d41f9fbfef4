"""The teacher EMA in fp32 under every ZeRO stage (DESIGN §4.7, §6).

With DeepSpeed's `torch_autocast` (fp32 parameters, bf16 compute) student and teacher parameters stay
fp32. Under ZeRO 0-2 every rank holds both in full and applies the same update; under ZeRO-3 each
rank holds the same flat partition (`param.ds_tensor`) of a student parameter and of its teacher twin
(same shape, `stage3_param_persistence_threshold` 0), so the update runs on local shards with no
gather. An update of (1 - m) * (student - teacher) with m >= 0.996 is below half a bf16 ulp: a bf16
teacher would never move, hence the fp32 check in `TeacherEMA.__init__`.
"""

from __future__ import annotations

import torch
from torch import nn


def local_tensor(p: nn.Parameter) -> torch.Tensor:
    """The storage this rank updates: the ZeRO-3 partition when there is one, else the parameter."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class TeacherEMA:
    """theta_t <- m * theta_t + (1 - m) * theta_s over matching `student.*` / `teacher.*` parameters
    of the training module."""

    def __init__(self, module: nn.Module):
        student = dict(module.student.named_parameters())
        teacher = dict(module.teacher.named_parameters())
        if student.keys() != teacher.keys():
            raise ValueError(f"student and teacher parameter names differ: "
                             f"{sorted(student.keys() ^ teacher.keys())[:5]}")
        self.names = list(teacher)
        self.teacher = [teacher[n] for n in self.names]
        self.student = [student[n] for n in self.names]
        for n, t, s in zip(self.names, self.teacher, self.student):
            lt, ls = local_tensor(t), local_tensor(s)
            if lt.dtype != torch.float32 or ls.dtype != torch.float32:
                raise ValueError(f"teacher EMA needs fp32 parameters, {n} is {lt.dtype}/{ls.dtype}; use "
                                 "DeepSpeed torch_autocast instead of bf16.enabled (ds_configs/README.md)")
            if lt.shape != ls.shape:
                raise ValueError(f"{n}: teacher shard {tuple(lt.shape)} != student shard {tuple(ls.shape)} "
                                 "(ZeRO-3 needs stage3_param_persistence_threshold 0)")

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        t = [local_tensor(p) for p in self.teacher]
        s = [local_tensor(p) for p in self.student]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def local_state(self) -> dict[str, torch.Tensor]:
        """Teacher tensors this rank holds, named without the `teacher.` prefix (1-D padded shards
        under ZeRO-3, full parameters otherwise)."""
        return {n: local_tensor(p).detach().clone() for n, p in zip(self.names, self.teacher)}

    @torch.no_grad()
    def load_local_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        missing = set(self.names) - state.keys()
        if missing:
            raise ValueError(f"{source}: missing teacher tensors {sorted(missing)[:5]}")
        for n, p in zip(self.names, self.teacher):
            dst = local_tensor(p)
            if state[n].shape != dst.shape:
                raise ValueError(f"{source}: {n} has shape {tuple(state[n].shape)}, this run holds "
                                 f"{tuple(dst.shape)} (same world size and ZeRO stage needed)")
            dst.copy_(state[n])
