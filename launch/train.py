"""Alice pretraining entry point (DESIGN §2, §6):

    deepspeed [--hostfile H] launch/train.py --deepspeed_config ds_configs/zero2_bf16.json \\
        --data_dir D --json_list J --cache_dir C --embed_dir E --output_dir O \\
        --batch_size 8 --num_steps 100000 [--lr 5e-4] [--preset B] [--config presets/tiny.yaml] [--resume auto]

Also runs under `torchrun`, `accelerate launch`, SLURM `srun` (launch/slurm.sbatch) and MPI launchers
(`deepspeed --launcher openmpi|mpich|impi|mvapich`): ranks come from the environment
(alice_ds.engine.distenv). A mistake in the input (a flag, the YAML, the DeepSpeed JSON, the cache,
the datalist) prints one line on rank 0 and exits 2 on every rank, before any process group starts.
"""

from __future__ import annotations

import argparse
import sys

from alice_ds.console import fail
from alice_ds.engine import flags
from alice_ds.engine.distenv import launcher_rank, setup_env
from alice_ds.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        usage="%(prog)s [--config YAML] [--preset NAME] --deepspeed_config JSON --json_list J --cache_dir C "
              "--output_dir O [--embed_dir E] [--FIELD VALUE ...]",
        description="Alice self-supervised pretraining with DeepSpeed (ZeRO 0-3, bf16 autocast, fp32 teacher EMA). "
                    "Every field of the config tree is a flag; flags override the --config YAML, which overrides "
                    "--preset, which overrides the defaults shown.",
        epilog="Preemption: SIGTERM or SIGUSR1 (to any process of the job, DataLoader workers included) finish "
               "the step, write a checkpoint and exit 0; under SLURM, SIGUSR1 (the time-limit warning of "
               "launch/slurm.sbatch) also requeues the job with `scontrol requeue $SLURM_JOB_ID` (the command "
               "is $ALICE_DS_REQUEUE when set), and --resume auto continues it. Tests inject faults with "
               "ALICE_DS_FAULT (docs/faults.md).")
    flags.add_arguments(parser)
    args = parser.parse_args(argv)
    started = False
    try:
        cfg = flags.config_from_args(args)
        env = setup_env()
        # imported here: deepspeed's import costs seconds, and --help or a bad flag must not wait for it
        from alice_ds.engine.runtime import distributed, preflight
        from alice_ds.engine.trainer import Trainer

        cfg, ds_config = preflight(cfg, env)
        with distributed(env):
            started = True
            return Trainer(cfg, env, ds_config).run()
    except UserError as e:
        if started or launcher_rank() == 0:  # before the start every rank has the same error: say it once
            fail(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
