"""The pretraining loop: DeepSpeed engine around `AliceMetaArch`, fp32 teacher EMA, schedules,
checkpoints, validation, metrics, faults (DESIGN §4.7, §6; issue "DeepSpeed pretraining").

One training step, in order: sample -> forward (student, teacher, CASA, loss) -> backward/step ->
EMA -> log. Step numbers: `step` counts finished optimizer steps; the schedules of the update that
finishes step N are evaluated at N - 1, its metrics line and checkpoint tag say N.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from itertools import repeat
from pathlib import Path

import torch

from alice_ds.console import console, progress, warn
from alice_ds.engine import checkpoint as ckpt
from alice_ds.engine.config import TrainConfig, global_batch, lr_range, resolve_ds_config
from alice_ds.engine.cpu_bf16 import guard_cpu_bf16_conv3d
from alice_ds.engine.distenv import DistEnv, release_cpu_allreduce_buffer
from alice_ds.engine.ema import TeacherEMA
from alice_ds.engine.schedules import Schedules
from alice_ds.errors import DataError, UserError

LOSS_KEYS = ("loss", "cls", "patch", "recon")
"""Loss parts reduced over ranks every micro-batch and written to metrics.jsonl."""
EXTRA_KEYS = ("teacher_entropy", "agreement")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Preemption signals: finish the step, checkpoint, exit 0."""
VAL_SEED_OFFSET = 1_000_003
"""The validation stream uses seed + this, so it never repeats a training sample's randomness."""
FP32_MAX_NORM = math.sqrt(torch.finfo(torch.float32).max)
"""~1.8e19: a global gradient norm above it overflows an fp32 sum of squares. DeepSpeed's ZeRO-1/2/3
then report inf and skip the update; the trainer applies the same criterion under ZeRO-0."""
# DeepSpeed 0.19's ZeRO-2/3 call it every step and torch 2.13 warns on each call (a line per rank per step)
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)
FAULT_ENV = "ALICE_DS_FAULT"
"""Fault injection for tests (`Faults`): unset in real runs."""
FAULT_EXIT_CODE = 17
"""Exit status of a rank killed by an injected `exit` fault."""
FAULT_FORMS = "nan:RANK:STEP[:COUNT], exit:RANK:STEP or term:RANK:STEP"
"""The specs `Faults` accepts, for its error messages."""


class TrainingError(UserError):
    """The run cannot continue (diverged); the message says why and where the last checkpoint is."""


class Faults:
    """Injected faults, read once from the environment variable `ALICE_DS_FAULT` (tests only; the
    fault paths cannot be reached on purpose otherwise). Comma-separated specs:

    - `nan:RANK:STEP[:COUNT]`: on rank RANK the first COUNT forward passes (all when omitted) of the
      step that finishes step STEP return a NaN loss;
    - `exit:RANK:STEP`: rank RANK dies (`os._exit(17)`, no cleanup) when step STEP starts;
    - `term:RANK:STEP`: rank RANK sends itself SIGTERM when step STEP starts (a preemption arriving
      mid-step, at a known step whatever the machine's load).
    """

    def __init__(self, spec: str, rank: int):
        self.nan: dict[int, float] = {}  # step -> NaN forward passes left on this rank (inf = all)
        self.exit_step: int | None = None
        self.term_step: int | None = None
        for item in filter(None, spec.split(",")):
            parts = item.split(":")
            try:
                kind, fault_rank, step = parts[0], int(parts[1]), int(parts[2])
                count = float(parts[3]) if len(parts) > 3 else math.inf
            except (IndexError, ValueError):
                raise UserError(f"{FAULT_ENV}: cannot parse {item!r} (want {FAULT_FORMS})") from None
            if kind not in ("nan", "exit", "term") or len(parts) > (4 if kind == "nan" else 3):
                raise UserError(f"{FAULT_ENV}: unknown fault {item!r} (want {FAULT_FORMS})")
            if fault_rank != rank:
                continue
            if kind == "nan":
                self.nan[step] = count
            elif kind == "exit":
                self.exit_step = step
            else:
                self.term_step = step

    def at_step_start(self, step: int) -> None:
        if self.exit_step == step:
            warn(f"{FAULT_ENV}: rank exits at step {step}")
            os._exit(FAULT_EXIT_CODE)
        if self.term_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    def loss(self, out: dict, step: int) -> dict:
        """`out` with a NaN loss when a `nan` fault covers this forward pass of `step`."""
        if self.nan.get(step, 0) <= 0:
            return out
        self.nan[step] -= 1
        return {**out, "loss": out["loss"] * float("nan")}


def _to_device(batch: dict, device, augment: bool) -> dict:
    """A collated batch on the training device; with `augment` (data.augment_on resolved to
    `device`) its views rotated and noised there from the parameters the workers drew."""
    from alice_ds.data.pairs import apply_device_augment

    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return apply_device_augment(batch) if augment else batch


def _case_ids(entries: list[dict]) -> list[str]:
    from alice_ds.data import case_id_from_path

    return [case_id_from_path(e["image"]) for e in entries]


class Trainer:
    """Build everything from a resolved `TrainConfig`, then `run()`."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        import deepspeed

        from alice_ds.method import AliceMetaArch

        self.cfg, self.env = cfg, env
        self.out = Path(cfg.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.rank, self.world = env.rank, env.world_size
        self.is_main = self.rank == 0
        self._check_cache_spacing()
        # user mistakes first, before any rendezvous; config.json records the final lr that runs
        self.peak_lr, cfg.optim.min_lr = lr_range(cfg, self.world)
        deepspeed.init_distributed()
        on_cpu = deepspeed.get_accelerator().device_name() == "cpu"
        if on_cpu:  # a world of one has a buffer too
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank has mapped the others' shared-memory buffers
            release_cpu_allreduce_buffer(self.rank)
        self.global_batch = global_batch(cfg, self.world)
        self.sched = Schedules(total_steps=cfg.run.num_steps, peak_lr=self.peak_lr, min_lr=cfg.optim.min_lr,
                               warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay,
                               weight_decay_end=cfg.optim.weight_decay_end,
                               momentum_start=cfg.optim.momentum_start, momentum_end=cfg.optim.momentum_end,
                               freeze_last_layer_steps=cfg.optim.freeze_last_layer_steps)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        ds_config = resolve_ds_config(cfg.run.deepspeed_config, cfg, self.world, str(self.out / "monitor"))
        self.zero_stage = int(ds_config["zero_optimization"].get("stage", 0))

        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        module = AliceMetaArch(cfg.model, cfg.loss)
        if on_cpu:
            guard_cpu_bf16_conv3d(module)  # bf16 autocast Conv3d weight-gradient bug (engine/cpu_bf16.py)
        else:
            torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
        optimizer = torch.optim.AdamW(module.param_groups(), lr=0.0, weight_decay=0.0, betas=cfg.optim.betas)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                                 config=ds_config)
        self.module = self.engine.module
        self.ema = TeacherEMA(self.module)
        if cfg.data.augment_on == "auto":  # resolved here, so config.json records what ran
            cfg.data.augment_on = "worker" if on_cpu else "device"
        self.augment_on_device = cfg.data.augment_on == "device"
        self.train_loader = self._loader("training", cfg.run.seed)
        self.step = 0
        self.best_val = float("inf")
        self.nonfinite_total = 0
        self._stop_signal: int | None = None
        self.skipped_updates = 0  # optimizer updates not applied (gradient norm not finite in fp32)
        self._ds_skipped = 0  # DeepSpeed's count of optimizer steps it skipped (non-finite gradients)
        self._skipped_in_row = 0
        self.faults = Faults(os.environ.get(FAULT_ENV, ""), self.rank)

    # ---- setup ---------------------------------------------------------------------------------
    def _check_cache_spacing(self) -> None:
        """Record the cache's spacing in the config (the export needs it); a spacing given in the
        config must match the cache."""
        from alice_ds.data.cache import list_cases, read_meta

        cases = list_cases(self.cfg.data.cache_dir)
        if not cases:
            raise DataError(self.cfg.data.cache_dir, "no cached cases (run `alice-ds preprocess` first)")
        spacing = tuple(float(s) for s in read_meta(self.cfg.data.cache_dir, cases[0])["spacing"])
        if self.cfg.data.spacing is not None and tuple(self.cfg.data.spacing) != spacing:
            raise UserError(f"data.spacing {self.cfg.data.spacing} differs from the cache's {spacing} "
                            f"({self.cfg.data.cache_dir})")
        self.cfg.data.spacing = spacing

    def _loader(self, split: str, seed: int):
        from alice_ds.data.datalist import load_datalist
        from alice_ds.data.pairs import PairConfig, PairDataset, PairLoader

        d = self.cfg.data
        entries = load_datalist(d.json_list, d.data_dir or Path(d.json_list).parent, check_files=False)
        cases = _case_ids(entries.get(split, []))
        if not cases:
            raise DataError(d.json_list, f"no cases in the {split!r} split")
        pair_cfg = PairConfig(roi=d.roi, hu_window=d.hu_window, mask_ratio=d.mask_ratio,
                              mask_block=d.mask_block, score_threshold=d.min_score,
                              augment_on="device" if self.augment_on_device else "worker")
        dataset = PairDataset(d.cache_dir, d.embed_dir, pair_cfg, seed=seed, rank=self.rank,
                              world_size=self.world, cases=cases)
        return PairLoader(dataset, self.cfg.run.batch_size, num_workers=d.num_workers,
                          persistent_workers=False)

    def _batches(self):
        """Endless micro-batches; with `overfit_one_batch` the stream's first batch forever (drawn
        from a fresh stream, so a resumed run repeats the same batch)."""
        if self.cfg.data.overfit_one_batch:
            first = next(iter(self._loader("training", self.cfg.run.seed)))
            yield from repeat(first)
        while True:
            yield from self.train_loader

    # ---- one step ------------------------------------------------------------------------------
    def _set_optimizer(self, step: int):
        v = self.sched.at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if (group["last_layer"] and v.freeze_last_layer) else v.lr
            group["weight_decay"] = v.weight_decay if group["apply_wd"] else 0.0
        return v

    def _reduce(self, values: list[float]) -> list[float]:
        """Sum over ranks of a few scalars (one small all-reduce)."""
        import deepspeed.comm as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t)
        return t.tolist()

    def _zero0_grad_norm(self) -> tuple[float, bool]:
        """ZeRO-0 (plain data parallel): DeepSpeed computes no global gradient norm in torch_autocast
        mode and would apply any update. At the accumulation boundary the gradients are all-reduced
        (equal on every rank): returns their norm (fp64) and whether the update is dropped. A dropped
        update zeroes the gradients and the lr of every group for this step, so no parameter moves
        (Adam's moments still decay by one step; DeepSpeed's clipping needs at least one gradient)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads))
        drop = not norm <= FP32_MAX_NORM
        if drop:
            for g in grads:
                g.zero_()
            for group in self.optimizer.param_groups:
                group["lr"] = 0.0
        return norm, drop

    def train_step(self, batches) -> dict:
        """One optimizer step of `grad_accum` finite micro-batches. A micro-batch whose loss is
        NaN/Inf on any rank is skipped on every rank (no backward, DeepSpeed's counters untouched) and
        another one is drawn; `max_nonfinite` skips in a row stop the run. An update whose global
        gradient norm is not finite in fp32 is skipped (DeepSpeed does it under ZeRO-1/2/3, the trainer
        under ZeRO-0), warned, counted, and `max_nonfinite` of them in a row stop the run."""
        cfg = self.cfg.run
        v = self._set_optimizer(self.step)
        self.faults.at_step_start(self.step + 1)
        t0 = time.perf_counter()
        sums = dict.fromkeys(LOSS_KEYS + EXTRA_KEYS, 0.0)
        done, skipped_in_row, skipped = 0, 0, 0
        grad_norm, zero0_dropped = None, False
        while done < cfg.grad_accum:
            # sample
            batch = _to_device(next(batches), self.engine.device, self.augment_on_device)
            # forward: student, teacher, CASA, loss
            out = self.faults.loss(self.engine(batch, self.step), self.step + 1)
            local = [float(out[k].detach()) for k in LOSS_KEYS + EXTRA_KEYS]
            bad = 0.0 if all(torch.isfinite(torch.tensor(local[:len(LOSS_KEYS)]))) else 1.0
            reduced = self._reduce([0.0 if bad else x for x in local] + [bad])
            if reduced[-1] > 0:
                skipped += 1
                skipped_in_row += 1
                self.nonfinite_total += 1
                if self.is_main:
                    warn(f"step {self.step + 1}: non-finite loss on {int(reduced[-1])} rank(s), micro-batch "
                         f"skipped ({skipped_in_row} in a row, {self.nonfinite_total} in total)")
                if skipped_in_row >= cfg.max_nonfinite:
                    raise TrainingError(f"{skipped_in_row} non-finite losses in a row at step {self.step + 1}: "
                                        f"stopping; {self._last_checkpoint()} (lower --lr or raise warmup_steps)")
                continue
            skipped_in_row = 0
            # backward / step (DeepSpeed steps the optimizer at the accumulation boundary)
            self.engine.backward(out["loss"])
            if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                grad_norm, zero0_dropped = self._zero0_grad_norm()
            self.engine.step()
            done += 1
            for k, x in zip(LOSS_KEYS + EXTRA_KEYS, reduced):
                sums[k] += x / (self.world * cfg.grad_accum)
        if self.zero_stage > 0:  # DeepSpeed's global norm (before clipping; inf when it skipped the update)
            ds_norm = self.engine.get_global_grad_norm()
            grad_norm = None if ds_norm is None else float(ds_norm)
        # a skipped update (every rank agrees): the student did not move, so neither does the teacher
        optimizer_skipped = zero0_dropped or self.engine.skipped_steps > self._ds_skipped
        self._ds_skipped = self.engine.skipped_steps
        if optimizer_skipped:
            self.nonfinite_total += 1
            self.skipped_updates += 1
            self._skipped_in_row += 1
            if self.is_main:
                norm = "unknown" if grad_norm is None else f"{grad_norm:.3g}"
                warn(f"step {self.step + 1}: global gradient norm {norm} overflows fp32, update skipped "
                     f"({self._skipped_in_row} in a row, {self.skipped_updates} in total; `optimizer_skipped` "
                     "in metrics.jsonl)")
            if self._skipped_in_row >= cfg.max_nonfinite:
                raise TrainingError(f"{self._skipped_in_row} optimizer steps in a row with non-finite gradients "
                                    f"at step {self.step + 1}: stopping; {self._last_checkpoint()} "
                                    "(lower --lr or raise warmup_steps)")
        else:
            self._skipped_in_row = 0
            # teacher EMA, fp32, on this rank's shards
            self.ema.update(v.momentum)
        self.step += 1
        dt = time.perf_counter() - t0
        memory = {}
        if self.engine.device.type == "cuda":  # high-water mark of this rank's allocations since the start
            memory["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.engine.device) / 2**30
        return {"step": self.step, **sums, "lr": v.lr, "weight_decay": v.weight_decay, "momentum": v.momentum,
                "teacher_temp": float(out["teacher_temp"]), "skipped": skipped,
                "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                "optimizer_skipped": optimizer_skipped, "skipped_updates": self.skipped_updates,
                "nonfinite_total": self.nonfinite_total, "step_time_s": dt,
                "samples_per_s": self.global_batch / dt, **memory}

    def _last_checkpoint(self) -> str:
        last = ckpt.step_tags(self.ckpt_root)
        return f"last good checkpoint: {self.ckpt_root / last[-1][1]}" if last else "no checkpoint written yet"

    # ---- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """Mean total loss over `val_batches` micro-batches per rank of the validation split, always
        the same samples (a fresh stream each time), centers untouched; back to train mode after."""
        loader = self._loader("validation", self.cfg.run.seed + VAL_SEED_OFFSET)
        self.engine.eval()
        total, n = 0.0, 0
        for batch, _ in zip(loader, range(self.cfg.run.val_batches)):
            out = self.engine(_to_device(batch, self.engine.device, self.augment_on_device), self.step,
                              update_centers=False)
            total += float(out["loss"].detach())
            n += 1
        self.engine.train()
        loss_sum, count = self._reduce([total, float(n)])
        return loss_sum / count

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, tag: str, update_latest: bool = True) -> Path:
        state = {"sampler": self.train_loader.state_dict(), "best_val": self.best_val,
                 "nonfinite_total": self.nonfinite_total, "skipped_updates": self.skipped_updates}
        return ckpt.save(self.engine, self.module, self.ema, self.ckpt_root, tag, self.step, self.cfg.to_dict(),
                         self.zero_stage, state, {}, self.cfg.run.keep_last, update_latest=update_latest)

    def maybe_resume(self) -> None:
        tag = ckpt.resolve_resume(self.ckpt_root, self.cfg.run.resume)
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
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """True on every rank when any rank got a preemption signal (one all-reduce per step)."""
        return self._reduce([1.0 if self._stop_signal is not None else 0.0])[0] > 0

    def _write_metrics(self, metrics: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events(
                [(f"Train/alice/{k}", float(metrics[k]), metrics["step"]) for k in
                 LOSS_KEYS + EXTRA_KEYS + ("momentum", "samples_per_s")])

    def _print_start(self) -> None:
        c = self.cfg
        n_student = sum(getattr(p, "ds_numel", p.numel()) for p in self.module.student.parameters())
        console.print(f"alice-ds pretraining: world {self.world} ({self.env.launcher}), ZeRO-{self.zero_stage}, "
                      f"F={c.model.feature_size}, roi {c.data.roi}^3, student {n_student / 1e6:.1f}M params, "
                      f"global batch {self.global_batch} = {c.run.batch_size} x {c.run.grad_accum} x "
                      f"{self.world}, lr {self.peak_lr:.3g} -> {c.optim.min_lr:.3g}, {c.run.num_steps} steps "
                      f"-> {self.out}")

    def run(self) -> int:
        """Train to `num_steps`; returns the exit status (0 also after a preemption checkpoint)."""
        cfg = self.cfg.run
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)
        self.maybe_resume()
        if self.is_main:
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            self._print_start()
        self.engine.train()
        batches = self._batches()
        with progress(disable=not self.is_main) as bar:
            task = bar.add_task("pretraining", total=cfg.num_steps, completed=self.step)
            while self.step < cfg.num_steps:
                m = self.train_step(batches)
                if self.cfg.run.val_every and self.step % cfg.val_every == 0:
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
                stop = self._stop_requested()
                if stop or self.step == cfg.num_steps or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save(ckpt.step_tag(self.step))
                if stop:
                    if self.is_main:
                        console.print(f"preemption signal: checkpoint {ckpt.step_tag(self.step)} written, "
                                      "exiting (resume with --resume auto)")
                    return 0
        if self.is_main:
            console.print(f"done: {self.step} steps, sampler {self.train_loader.stats()}")
        return 0
