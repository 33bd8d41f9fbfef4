"""Everything DeepSpeed (the only package that imports it):

- `config`: the typed config tree (model, data, sampler, optim, loss, run) and `resolve`;
- `flags`: the command line of launch/train.py, generated from the config tree;
- `ds_config`: the DeepSpeed JSON, filled and checked;
- `runtime`: pre-flight checks before any rendezvous, the process group's start and teardown;
- `schedules`: lr / weight decay / teacher momentum / last-layer freeze as pure functions of the step;
- `distenv`: rank discovery for deepspeed, torchrun, accelerate, SLURM srun and MPI launchers;
- `ema`: the fp32 teacher EMA on each rank's own shards (ZeRO 0-3);
- `cpu_bf16`: fp32 for the Conv3d calls that hit oneDNN's bf16 weight-gradient bug on the CPU;
- `flops`: FLOPs per sample and MFU;
- `checkpoint`, `checkpoint_layout`: DeepSpeed checkpoints plus our state, written crash-safe, loaded
  with `weights_only=True`, the resume tag decided by rank 0;
- `trainer`: the loop (`launch/train.py` runs it); `preemption`: stop signals and the SLURM requeue;
  `faults`: fault injection for its tests (docs/faults.md);
- `export_zero`: reading teacher/student weights back out of a checkpoint (`alice-ds convert`).
"""
