"""Alice pretraining entry point (DESIGN §2, §6):

    deepspeed [--hostfile H] launch/train.py --deepspeed_config ds_configs/zero2_bf16.json \\
        --data_dir D --json_list J --cache_dir C --embed_dir E --output_dir O \\
        --batch_size 8 --num_steps 100000 --lr 5e-5 [--preset B] [--config presets/tiny.yaml] [--resume auto]

Also runs under `torchrun`, `accelerate launch` and SLURM `srun` (launch/slurm.sbatch): ranks come
from the environment (alice_ds.engine.distenv). User mistakes print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from alice_ds.console import fail
    from alice_ds.engine import config
    from alice_ds.errors import UserError

    parser = argparse.ArgumentParser(
        prog="launch/train.py", description="Alice self-supervised pretraining with DeepSpeed "
        "(ZeRO 0-3, bf16 autocast, fp32 teacher EMA). Command-line flags (--preset included) override "
        "the --config YAML, which overrides the defaults.",
        epilog="Tests only: the environment variable ALICE_DS_FAULT injects faults, comma-separated "
        "nan:RANK:STEP[:COUNT] (NaN loss for the first COUNT forward passes of STEP, all if omitted), "
        "exit:RANK:STEP (the rank dies with status 17) and term:RANK:STEP (the rank sends itself SIGTERM "
        "when STEP starts); see alice_ds/engine/trainer.py Faults.")
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        from alice_ds.engine.distenv import setup_env
        from alice_ds.engine.trainer import Trainer

        cfg = config.config_from_args(args)
        env = setup_env()
        rc = Trainer(cfg, env).run()
        import torch.distributed as dist

        if dist.is_initialized():  # NCCL warns at exit otherwise
            dist.destroy_process_group()
        return rc
    except UserError as e:
        fail(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
