"""Everything DeepSpeed (the only package besides launch/ that imports it; imported lazily):

- `config`: the typed config tree, CLI flags, DeepSpeed JSON resolution;
- `schedules`: lr / weight decay / teacher momentum / last-layer freeze as pure functions of the step;
- `distenv`: rank discovery for deepspeed, torchrun, accelerate and SLURM srun;
- `ema`: the fp32 teacher EMA on each rank's own shards (ZeRO 0-3);
- `cpu_bf16`: fp32 for the Conv3d calls that hit oneDNN's bf16 weight-gradient bug on the CPU;
- `checkpoint`: DeepSpeed checkpoints plus our state, `latest` after a barrier, exact resume;
- `trainer`: the loop (`launch/train.py` runs it);
- `export_zero`: reading teacher/student weights back out of a checkpoint (`alice-ds convert`).
"""
