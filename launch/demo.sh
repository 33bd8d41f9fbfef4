#!/usr/bin/env bash
# `make demo`: the whole pipeline on built-in phantom CTs, end to end, in work/demo (about 10 minutes
# on a 2-core CPU; every stage is the real command a user runs, at toy sizes):
#   phantoms -> datalist -> preprocess cache -> SAM training -> SAM embeddings -> body levels -> landmark check
#   -> 2-rank DeepSpeed ZeRO-2 pretraining (tiny preset) -> export to MONAI SwinUNETR weights
#   -> PNG curves of the pretraining run. Fine-tuning is not part of it: even 10 steps with one
#   sliding-window validation at the export's 2 mm take over a minute on 2 cores; the last lines
#   print the command.
# Re-running skips what is already done (idempotent stages); `make clean` starts over.
set -euo pipefail
W=${DEMO_DIR:-work/demo}
NUM=${DEMO_CASES:-6}
SAM_MINUTES=${DEMO_SAM_MINUTES:-3}
STEPS=${DEMO_STEPS:-8}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
mkdir -p "$W"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/10 phantom CTs ($NUM small cases)"
[ -f "$W/phantoms/dataset.json" ] || alice-ds phantom "$W/phantoms" --num "$NUM" --seed 0 --small
step "2/10 datalist"
alice-ds datalist "$W/phantoms" -o "$W/datalist.json" --val_fraction 0.2
step "3/10 preprocess (RAS, 2 mm, int16 memory-mapped cache)"
alice-ds preprocess --data_dir "$W/phantoms" --json_list "$W/datalist.json" --cache_dir "$W/cache" \
  --spacing 2 2 2 --workers 2
step "4/10 SAM self-supervised training (${SAM_MINUTES} min budget)"
[ -f "$W/sam/sam.safetensors" ] || alice-ds sam-train --cache_dir "$W/cache" --json_list "$W/datalist.json" \
  --output_dir "$W/sam" --steps 400 --max_minutes "$SAM_MINUTES"
step "5/10 SAM embeddings"
alice-ds embed --cache_dir "$W/cache" --sam_checkpoint "$W/sam/sam.safetensors" --embed_dir "$W/embed"
step "6/10 body levels of the cases (the pair sampler's prior)"
alice-ds sam-levels --embed_dir "$W/embed" --cache_dir "$W/cache" --partners 2 --points 16
step "7/10 SAM landmark matching across subjects"
alice-ds sam-eval --embed_dir "$W/embed" --landmarks "$W/phantoms/landmarks" --json "$W/sam_eval.json"
step "8/10 Alice pretraining: 2 ranks, ZeRO-2, bf16 autocast, tiny preset, $STEPS steps"
OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py --config presets/tiny.yaml \
  --deepspeed_config ds_configs/zero2_bf16.json \
  --data_dir "$W/phantoms" --json_list "$W/datalist.json" --cache_dir "$W/cache" --embed_dir "$W/embed" \
  --output_dir "$W/run" --num_steps "$STEPS" --save_every 4 --resume auto
step "9/10 export the EMA teacher to MONAI SwinUNETR weights and verify"
alice-ds convert "$W/run" --out "$W/alice_swinunetr.safetensors" --verify
step "10/10 plots of the pretraining run"
alice-ds plot "$W/run"
printf '\nDone. Weights: %s (load with alice_ds.load_pretrained). Metrics: %s. Plots: %s\n' \
  "$W/alice_swinunetr.safetensors" "$W/run/metrics.jsonl" "$W/run/plots/"
printf 'Fine-tune next (docs/finetuning.md): alice-ds finetune --data_dir %s --json_list %s --weights %s --output_dir %s --roi 64 --classes liver=1 kidneys=2,7 spleen=3 vertebrae=11 bowel=15 --steps 200\n' \
  "$W/phantoms" "$W/datalist.json" "$W/alice_swinunetr.safetensors" "$W/finetune"
