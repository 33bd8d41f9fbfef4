"""The pretraining loop: DeepSpeed engine around `AliceMetaArch`, fp32 teacher EMA, schedules,
checkpoints, validation, metrics (DESIGN §4.7, §6).

One training step, in order: sample -> forward (student, teacher, CASA, loss) -> backward/step ->
EMA -> log. Step numbers: `step` counts finished optimizer steps; the schedules of the update that
finishes step N are evaluated at N - 1, its metrics line and checkpoint tag say N. The config comes
in resolved (`engine.runtime.preflight`) and is never changed here.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from itertools import repeat
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch

from alice_ds.console import console, progress, warn
from alice_ds.data.datalist import split_case_ids
from alice_ds.engine import checkpoint as ckpt
from alice_ds.engine.config import TrainConfig, global_batch, peak_lr
from alice_ds.engine.cpu_bf16 import guard_cpu_bf16_conv3d
from alice_ds.engine.distenv import DistEnv
from alice_ds.engine.ema import TeacherEMA
from alice_ds.engine.faults import FAULT_ENV, Faults
from alice_ds.engine.flops import device_peak_tflops, flops_per_sample
from alice_ds.engine.monitors import MonitorWatch
from alice_ds.engine.preemption import StopSignals, requeue_slurm_job
from alice_ds.engine.schedules import Schedules, StepValues
from alice_ds.errors import UserError
from alice_ds.files import atomic_write_text
from alice_ds.losses.alice import MONITORS
from alice_ds.method import AliceMetaArch
from alice_ds.sampler import AUG_KEYS, PairDataset, PairLoader, apply_device_augment

LOSS_KEYS = ("loss", "cls", "patch", "recon")
"""Loss parts reduced over ranks every micro-batch and written to metrics.jsonl."""
VAL_SEED_OFFSET = 1_000_003
"""The validation stream uses seed + this, so it never repeats a training sample's randomness."""
FP32_MAX_NORM = math.sqrt(torch.finfo(torch.float32).max)
"""~1.8e19: a global gradient norm above it overflows an fp32 sum of squares. DeepSpeed's ZeRO-1/2/3
then report inf and skip the update; the trainer applies the same criterion under ZeRO-0."""
# DeepSpeed 0.19's ZeRO-2/3 call them every step and torch 2.13 warns on each call (a line per rank per step)
warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into|reduce_scatter)_tensor` is deprecated",
                        FutureWarning)


class TrainingError(UserError):
    """The run cannot continue (diverged); the message says why and where the last checkpoint is."""


def _to_device(batch: dict, device, augment: bool) -> dict:
    """A collated batch on the training device; with `augment` (sampler.augment_on `device`) its views
    rotated and noised there from the parameters the workers drew (left on the host: no sync)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in AUG_KEYS else v
             for k, v in batch.items()}
    return apply_device_augment(batch) if augment else batch


def _add_center_sums(acc: dict | None, sums: dict) -> dict:
    """Teacher column sums and row counts of one micro-batch added to those of the step so far."""
    return dict(sums) if acc is None else {k: acc[k] + sums[k] for k in acc}


def _bf16_autocast(ds_config: dict) -> bool:
    autocast = ds_config.get("torch_autocast", {})
    return bool(autocast.get("enabled")) and autocast.get("dtype", "bfloat16") in ("bfloat16", "torch.bfloat16")


class Trainer:
    """Build everything from a resolved `TrainConfig` and its DeepSpeed JSON inside a process group
    (`engine.runtime.distributed`), then `run()`."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, ds_config: dict):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.rank, self.world, self.is_main = env.rank, env.world_size, env.rank == 0
        self.global_batch = global_batch(cfg, self.world)
        o = cfg.optim
        self.sched = Schedules(total_steps=cfg.run.num_steps, peak_lr=peak_lr(cfg, self.world), min_lr=o.min_lr,
                               warmup_steps=o.warmup_steps, weight_decay=o.weight_decay,
                               weight_decay_end=o.weight_decay_end, momentum_start=o.momentum_start,
                               momentum_end=o.momentum_end, freeze_last_layer_steps=o.freeze_last_layer_steps)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.zero_stage = int(ds_config["zero_optimization"].get("stage", 0))

        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        module = AliceMetaArch(cfg.model, cfg.loss)
        if deepspeed.get_accelerator().device_name() == "cpu":
            guard_cpu_bf16_conv3d(module)  # bf16 autocast Conv3d weight-gradient bug (engine/cpu_bf16.py)
        else:
            torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
        groups = module.param_groups()
        # (last_layer, apply_wd) per group, kept here: DeepSpeed 0.19's universal-checkpoint load under
        # ZeRO-3 copies group 0's keys into every param group
        self.group_flags = [(g["last_layer"], g["apply_wd"]) for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=o.betas)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        ckpt.load_weights_only(self.engine)
        self.ema = TeacherEMA(self.module)
        self.augment_on_device = cfg.sampler.augment_on == "device"
        self.train_loader = self._loader("training", cfg.run.seed)
        self._val: tuple[PairLoader, dict] | None = None  # validation loader and its first position
        self.reduced_keys = LOSS_KEYS + MONITORS + (("casa_attn_ratio",) if cfg.model.casa else ())
        self.flops_per_sample = flops_per_sample(cfg.model, cfg.loss, cfg.sampler.roi)
        self.peak_tflops = device_peak_tflops(self.engine.device, _bf16_autocast(ds_config))
        self.step = 0
        self.best_val = float("inf")
        self.nonfinite_total = 0
        self.skipped_updates = 0  # optimizer updates not applied (gradient norm not finite in fp32)
        self._nonfinite_in_row = 0  # micro-batches with a non-finite loss since the last good one
        self._skipped_in_row = 0  # skipped updates since the last applied one
        self._ds_skipped = 0  # DeepSpeed's count of optimizer steps it skipped (non-finite gradients)
        self.stop_signals = StopSignals()
        self.faults = Faults(os.environ.get(FAULT_ENV, ""), self.rank)
        self.watch = MonitorWatch(cfg.model.out_dim)

    # ---- setup ---------------------------------------------------------------------------------
    def _loader(self, split: str, seed: int) -> PairLoader:
        d = self.cfg.data
        dataset = PairDataset(d.cache_dir, d.embed_dir, self.cfg.sampler, seed=seed, rank=self.rank,
                              world_size=self.world, cases=split_case_ids(d.json_list, split))
        return PairLoader(dataset, self.cfg.run.batch_size, num_workers=d.num_workers, persistent_workers=False,
                          pin_memory=self.engine.device.type == "cuda")  # pinned: non_blocking copies

    def _batches(self):
        """Endless micro-batches; with `overfit_one_batch` the stream's first batch forever (drawn
        from a fresh stream, so a resumed run repeats the same batch)."""
        if self.cfg.data.overfit_one_batch:
            first = next(iter(self._loader("training", self.cfg.run.seed)))
            yield from repeat(first)
        while True:
            yield from self.train_loader

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        """One optimizer step of `grad_accum` finite micro-batches. A micro-batch whose loss is
        NaN/Inf on any rank is skipped on every rank (no backward, DeepSpeed's counters untouched) and
        another one is drawn. An update whose global gradient norm is not finite in fp32 is skipped
        (by DeepSpeed under ZeRO-1/2/3, by the trainer under ZeRO-0). `max_nonfinite` of either in a
        row stop the run."""
        v = self._set_optimizer(self.step)
        t0 = time.perf_counter()
        sums = dict.fromkeys(self.reduced_keys, 0.0)
        done, skipped, zero0, centers = 0, 0, None, None
        while done < self.cfg.run.grad_accum:
            # sample
            batch = _to_device(next(batches), self.engine.device, self.augment_on_device)
            # forward: student, teacher, CASA, loss
            out = self.faults.loss(self.engine(batch, self.step), self.step + 1)
            reduced = self._reduce_or_skip(out)
            if reduced is None:
                skipped += 1
                continue
            # backward / step (DeepSpeed steps the optimizer at the accumulation boundary)
            self.engine.backward(out["loss"])
            if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                zero0 = self._zero0_grad_norm()
            self.engine.step()
            done += 1
            centers = _add_center_sums(centers, out["center_sums"])
            for k, x in reduced.items():
                sums[k] += x / (self.world * self.cfg.run.grad_accum)
        # loss centers: once per optimizer step, from its finite micro-batches (one all-reduce)
        self.module.loss.update_centers(**centers)
        grad_norm, update_skipped = self._update_outcome(zero0)
        # EMA: fp32, on this rank's shards; a skipped update moved no student, so no teacher either
        if not update_skipped:
            self.ema.update(v.momentum)
        self.step += 1
        self.faults.at_step_end(self.step)
        # log
        return self._metrics(sums, v, float(out["teacher_temp"]), skipped, grad_norm, update_skipped,
                             time.perf_counter() - t0)

    def _set_optimizer(self, step: int) -> StepValues:
        v = self.sched.at(step)
        for group, (last_layer, apply_wd) in zip(self.optimizer.param_groups, self.group_flags, strict=True):
            group["lr"] = 0.0 if (last_layer and v.freeze_last_layer) else v.lr
            group["weight_decay"] = v.weight_decay if apply_wd else 0.0
        return v

    def _reduce(self, values: list[float]) -> list[float]:
        """Sum over ranks of a few scalars (one small all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t)
        return t.tolist()

    def _reduce_or_skip(self, out: dict) -> dict[str, float] | None:
        """The loss parts summed over ranks, or None when any rank's loss is not finite: then the
        micro-batch is skipped everywhere, warned and counted (a TrainingError after `max_nonfinite`
        in a row)."""
        local = torch.stack([out[k].detach().double() for k in self.reduced_keys]).tolist()  # one device sync
        bad = 0.0 if all(math.isfinite(x) for x in local[:len(LOSS_KEYS)]) else 1.0
        reduced = self._reduce([0.0 if bad else x for x in local] + [bad])
        if reduced[-1] == 0:
            self._nonfinite_in_row = 0
            return dict(zip(self.reduced_keys, reduced))
        self._nonfinite_in_row += 1
        self.nonfinite_total += 1
        if self.is_main:
            warn(f"step {self.step + 1}: non-finite loss on {int(reduced[-1])} rank(s), micro-batch skipped "
                 f"({self._nonfinite_in_row} in a row, {self.nonfinite_total} in total)")
        if self._nonfinite_in_row >= self.cfg.run.max_nonfinite:
            raise TrainingError(f"{self._nonfinite_in_row} non-finite losses in a row at step {self.step + 1}: "
                                f"stopping; {self._last_checkpoint()} (lower --lr or raise warmup_steps)")
        return None

    def _zero0_grad_norm(self) -> tuple[float, bool]:
        """ZeRO-0 (plain data parallel): DeepSpeed computes no global gradient norm in torch_autocast
        mode and would apply any update. At the accumulation boundary the gradients are all-reduced
        (equal on every rank): returns their norm (fp64) and whether the update is dropped. A dropped
        update zeroes the gradients and the lr of every group for this step, so no parameter moves
        (Adam's moments still decay by one step; DeepSpeed's clipping needs at least one gradient)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norms = torch._foreach_norm(grads, 2.0)  # per tensor, one kernel each, no host sync
        norm = float(torch.linalg.vector_norm(torch.stack([n.double() for n in norms])))  # one sync
        drop = not norm <= FP32_MAX_NORM
        if drop:
            for g in grads:
                g.zero_()
            for group in self.optimizer.param_groups:
                group["lr"] = 0.0
        return norm, drop

    def _update_outcome(self, zero0: tuple[float, bool] | None) -> tuple[float | None, bool]:
        """(global gradient norm before clipping, whether the update was skipped) of the step that
        just ended: the trainer's own ZeRO-0 check, or DeepSpeed's norm and skip counter. A skipped
        update is warned and counted (a TrainingError after `max_nonfinite` in a row)."""
        if self.zero_stage == 0:
            grad_norm, skipped = zero0 if zero0 is not None else (None, False)
        else:  # DeepSpeed's global norm (inf when it skipped the update)
            ds_norm = self.engine.get_global_grad_norm()
            grad_norm = None if ds_norm is None else float(ds_norm)
            skipped = self.engine.skipped_steps > self._ds_skipped
        self._ds_skipped = self.engine.skipped_steps
        if not skipped:
            self._skipped_in_row = 0
            return grad_norm, False
        self.nonfinite_total += 1
        self.skipped_updates += 1
        self._skipped_in_row += 1
        if self.is_main:
            norm = "unknown" if grad_norm is None else f"{grad_norm:.3g}"
            warn(f"step {self.step + 1}: global gradient norm {norm} overflows fp32, update skipped "
                 f"({self._skipped_in_row} in a row, {self.skipped_updates} in total; `optimizer_skipped` "
                 "in metrics.jsonl)")
        if self._skipped_in_row >= self.cfg.run.max_nonfinite:
            raise TrainingError(f"{self._skipped_in_row} optimizer steps in a row with non-finite gradients "
                                f"at step {self.step + 1}: stopping; {self._last_checkpoint()} "
                                "(lower --lr or raise warmup_steps)")
        return grad_norm, True

    def _metrics(self, sums: dict, v: StepValues, teacher_temp: float, skipped: int, grad_norm: float | None,
                 update_skipped: bool, dt: float) -> dict:
        """The metrics.jsonl line of the step that just finished."""
        tflops = self.flops_per_sample * self.global_batch / self.world / dt / 1e12  # per device
        extra = {}
        if self.peak_tflops:
            extra["mfu"] = tflops / self.peak_tflops
        if self.engine.device.type == "cuda":  # high-water mark of this rank's allocations since the start
            extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.engine.device) / 2**30
        return {"step": self.step, **sums, "lr": v.lr, "weight_decay": v.weight_decay, "momentum": v.momentum,
                "teacher_temp": teacher_temp, "skipped": skipped,
                "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                "optimizer_skipped": update_skipped, "skipped_updates": self.skipped_updates,
                "nonfinite_total": self.nonfinite_total, "step_time_s": dt,
                "samples_per_s": self.global_batch / dt, "tflops_per_device": tflops, **extra}

    def _last_checkpoint(self) -> str:
        last = ckpt.step_tags(self.ckpt_root)
        return f"last good checkpoint: {self.ckpt_root / last[-1][1]}" if last else "no checkpoint written yet"

    # ---- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """Mean total loss over `val_batches` micro-batches per rank of the validation split, always
        the same samples (a fresh stream each time), centers untouched; back to train mode after."""
        if self._val is None:  # built once; every validation rewinds it to its first sample
            loader = self._loader("validation", self.cfg.run.seed + VAL_SEED_OFFSET)
            self._val = (loader, loader.state_dict())
        loader, start = self._val
        loader.load_state_dict(start)
        self.engine.eval()
        total, n = 0.0, 0
        for _, batch in zip(range(self.cfg.run.val_batches), loader):  # (no extra batch drawn)
            out = self.engine(_to_device(batch, self.engine.device, self.augment_on_device), self.step)
            total += float(out["loss"].detach())
            n += 1
        self.engine.train()
        loss_sum, count = self._reduce([total, float(n)])
        return loss_sum / count

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, tag: str, update_latest: bool = True) -> Path:
        state = {"sampler": self.train_loader.state_dict(), "best_val": self.best_val,
                 "nonfinite_total": self.nonfinite_total, "skipped_updates": self.skipped_updates}
        return ckpt.save(self.engine, self.module, self.ema, self.ckpt_root, tag, step=self.step,
                         config=self.cfg.to_dict(), zero_stage=self.zero_stage, rank_state=state,
                         keep_last=self.cfg.run.keep_last, update_latest=update_latest, faults=self.faults)

    def maybe_resume(self) -> None:
        """Resume from the tag rank 0 resolves (`--resume`); every rank checks that all loaded the
        same step."""
        tag = ckpt.agree_on_resume(self.ckpt_root, self.cfg.run.resume)
        if tag is None:
            return
        alice_state, rank_state = ckpt.load(self.engine, self.module, self.ema, self.ckpt_root, tag,
                                            self.zero_stage)
        self.step = int(alice_state["step"])
        self.train_loader.load_state_dict(rank_state["sampler"])
        self.best_val = float(rank_state["best_val"])
        self.nonfinite_total = int(rank_state["nonfinite_total"])
        self.skipped_updates = int(rank_state["skipped_updates"])
        self._ds_skipped = self.engine.skipped_steps
        if self.is_main:
            console.print(f"resumed from {self.ckpt_root / tag} at step {self.step}")

    # ---- the loop ------------------------------------------------------------------------------
    def _stop_requested(self) -> tuple[bool, bool]:
        """(stop, requeue), the same on every rank (one all-reduce per step): stop when any rank got a
        stop signal; requeue (under SLURM) when one of them was SIGUSR1, the time-limit warning."""
        term, usr1 = self._reduce(self.stop_signals.flags())
        return term + usr1 > 0, usr1 > 0

    def _write_metrics(self, metrics: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events(
                [(f"Train/alice/{k}", float(metrics[k]), metrics["step"]) for k in
                 self.reduced_keys + ("momentum", "samples_per_s", "tflops_per_device")])

    def _print_start(self) -> None:
        c = self.cfg
        n_student = sum(getattr(p, "ds_numel", p.numel()) for p in self.module.student.parameters())
        peak = f", MFU against {self.peak_tflops:g} bf16 TFLOP/s" if self.peak_tflops else ""
        console.print(f"alice-ds pretraining: world {self.world} ({self.env.launcher}), ZeRO-{self.zero_stage}, "
                      f"F={c.model.feature_size}, roi {c.sampler.roi}^3, student {n_student / 1e6:.1f}M params, "
                      f"{self.flops_per_sample / 1e9:.1f} GFLOP per sample{peak}, global batch {self.global_batch} = "
                      f"{c.run.batch_size} x {c.run.grad_accum} x {self.world}, peak lr {self.sched.peak_lr:.3g} -> "
                      f"{c.optim.min_lr:.3g}, {c.run.num_steps} steps -> {self.out}")

    def run(self) -> int:
        """Train to `num_steps`; returns the exit status (0 also after a preemption checkpoint)."""
        self.stop_signals.install()
        self.maybe_resume()
        if self.is_main:
            atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2))
            self._print_start()
        self.engine.train()
        batches = self._batches()
        try:
            return self._train(batches)
        finally:
            batches.close()  # shuts the DataLoader workers down (they ignore the stop signals)

    def _train(self, batches) -> int:
        """Steps until `num_steps` or a stop signal; validation, metrics and checkpoints on schedule."""
        cfg = self.cfg.run
        with progress(disable=not self.is_main) as bar:
            task = bar.add_task("pretraining", total=cfg.num_steps, completed=self.step)
            while self.step < cfg.num_steps:
                m = self.train_step(batches)
                for message in self.watch.check(self.step, m) if self.is_main else ():
                    warn(message)
                if cfg.val_every and self.step % cfg.val_every == 0:
                    m["val_loss"] = self.validate()
                    if m["val_loss"] < self.best_val:
                        self.best_val = m["val_loss"]
                        self.save(ckpt.BEST_TAG, update_latest=False)
                if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.num_steps):
                    m.update({f"sampler_{k}": v for k, v in self.train_loader.stats().items()})
                    self._write_metrics(m)
                bar.update(task, completed=self.step,
                           description=f"loss {m['loss']:.3f} (cls {m['cls']:.3f} patch {m['patch']:.3f} "
                                       f"recon {m['recon']:.4f}) lr {m['lr']:.2e} {m['samples_per_s']:.1f} smp/s")
                stop, requeue = self._stop_requested()
                if stop or self.step == cfg.num_steps or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save(ckpt.step_tag(self.step))
                if stop:
                    if self.is_main:
                        console.print(f"preemption signal: checkpoint {ckpt.step_tag(self.step)} written, "
                                      "exiting (resume with --resume auto)")
                        cmd = requeue_slurm_job() if requeue else None
                        if cmd:
                            console.print(f"SLURM job requeued ({' '.join(cmd)})")
                    return 0
        if self.is_main:
            console.print(f"done: {self.step} steps, sampler {self.train_loader.stats()}")
        return 0
