#!/usr/bin/env bash
# The GPU checks of alice-ds in one go, most important first (about 8-10 minutes on one H200):
#   info         GPU, driver, versions
#   kernel_tests tests/test_kernels_cuda.py: the Triton kernels compiled for the GPU vs the reference
#   kernels      benchmarks/kernels.py --dtype bfloat16 (Triton vs eager, GB/s, extra memory)
#   data         8 small phantoms -> datalist -> 2 mm cache -> SAM embeddings (SAM_CHECKPOINT)
#   train        preset B (F=48), 96^3 ($PRESET, $ROI), bf16 autocast, ZeRO-2, one GPU, $STEPS steps through the
#                deepspeed launcher: samples/s and peak memory from metrics.jsonl
#   throughput   benchmarks/throughput.py preset B 96^3 bf16 batch 2, ZeRO-1/2/3 by phase, and the
#                reference-style loop in the same run (the speed-up ratio)
#   sdpa         benchmarks/sdpa_windows.py: does the memory-efficient kernel take the window
#                attention, padded to 8 tokens and not
#   backbone     benchmarks/backbone.py F=48 96^3 batch 2 bf16 (TFLOP/s, MFU) and F=24 96^3 fp32
#   embed_full   `embed` seconds per 2 mm case with a full-width (ResNet-18) SAMNet, untrained
#   sampler      benchmarks/sampler.py, small: apply_device_augment on the GPU
#   kernels_fp32 benchmarks/kernels.py in fp32
#   max_size     benchmarks/max_size.py: largest preset and batch per ZeRO stage with checkpointing and
#                offload (not in the default list: up to 10 minutes more; ONLY=max_size runs it)
#   sam_reference  `sam-train --recipe reference` at scale: $SAM_REF_CASES small phantoms (200; a
#                tenth held out), width $SAM_REF_WIDTH (1.0), $SAM_REF_MINUTES minutes (5), then the
#                held-out landmarks (sam-eval, global and coarse-only search) and the pair sampler's
#                precision (not in the default list: about 9 minutes; ONLY=sam_reference runs it alone)
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [SAM_CHECKPOINT]
#
# OUT_DIR receives log.txt and at most nine JSON/JSONL reports (sam_reference: five more); scratch
# data goes to $WORK (default /tmp/alice_gpu_checks). Each stage runs under its own time limit and a
# failing stage does not stop the next; ONLY="train backbone" runs a subset. Without SAM_CHECKPOINT
# the data stage trains a tiny SAM for 60 s first. Needs CUDA and the package with its dependencies.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [SAM_CHECKPOINT]}
SAM=${2:-}
WORK=${WORK:-/tmp/alice_gpu_checks}
STEPS=${STEPS:-50} PRESET=${PRESET:-B} ROI=${ROI:-96}
ONLY=${ONLY:-info kernel_tests kernels data train throughput sdpa backbone embed_full sampler kernels_fp32}
ALICE=${ALICE:-alice-ds}   # e.g. "python3 -m alice_ds.cli" where the console script is not on PATH
export PYTHONUNBUFFERED=1 ALICE_DS_PROGRESS=${ALICE_DS_PROGRESS:-0}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1

stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  [[ " $ONLY " == *" $name "* ]] || return 0
  printf '\n== %s (limit %s s) %s\n' "$name" "$limit" "$(date -u +%FT%TZ)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@"  # functions reach the child through export -f
  printf '== %s: rc %s in %s s\n' "$name" "$?" "$((SECONDS - t0))"
}

info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'EOF'
import sys, torch, triton, deepspeed, monai
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, deepspeed {deepspeed.__version__}, monai {monai.__version__}")
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
EOF
}

data() {
  local d=$WORK/data
  [ -f "$d/phantoms/dataset.json" ] || $ALICE phantom "$d/phantoms" --num 8 --seed 0 --small
  $ALICE datalist "$d/phantoms" -o "$d/datalist.json" --val_fraction 0.25
  $ALICE preprocess --data_dir "$d/phantoms" --json_list "$d/datalist.json" --cache_dir "$d/cache" \
    --spacing 2 2 2 --workers 8
  if [ -z "$SAM" ]; then
    $ALICE sam-train --cache_dir "$d/cache" --json_list "$d/datalist.json" --output_dir "$d/sam" \
      --width 0.125 --roi 48 --steps 2000 --max_minutes 1
    SAM=$d/sam/sam.safetensors
  fi
  $ALICE embed --cache_dir "$d/cache" --sam_checkpoint "$SAM" --embed_dir "$d/embed" --force
  $ALICE sam-eval --embed_dir "$d/embed" --landmarks "$d/phantoms/landmarks"
}

train() {
  local d=$WORK/data
  rm -rf "$WORK/run_b"
  python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py --preset "$PRESET" --roi "$ROI" \
    --deepspeed_config ds_configs/zero2_bf16.json --data_dir "$d/phantoms" --json_list "$d/datalist.json" \
    --cache_dir "$d/cache" --embed_dir "$d/embed" --output_dir "$WORK/run_b" --num_steps "$STEPS" \
    --batch_size 2 --num_workers 8 --warmup_steps 10 --save_every "$STEPS" --log_every 1
  local rc=$?
  cp "$WORK/run_b/metrics.jsonl" "$OUT/train_metrics.jsonl"
  python3 - "$WORK/run_b/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
late = rows[len(rows) // 5:]  # past the warm-up steps (cudnn autotuning, first batches)
print(f"{len(rows)} steps; steps {late[0]['step']}-{late[-1]['step']}: median {statistics.median(r['samples_per_s'] for r in late):.2f} "
      f"samples/s, median step {statistics.median(r['step_time_s'] for r in late):.3f} s; "
      f"peak memory {max(r.get('peak_mem_gib', 0) for r in rows):.2f} GiB; loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
EOF
  return $rc
}

embed_full() {
  local d=$WORK/data
  $ALICE sam-train --cache_dir "$d/cache" --json_list "$d/datalist.json" --output_dir "$WORK/sam_full" \
    --width 1.0 --steps 1 --save_every 1
  $ALICE embed --cache_dir "$d/cache" --sam_checkpoint "$WORK/sam_full/sam.safetensors" \
    --embed_dir "$WORK/embed_full" --force
}

sam_reference() {
  local d=$WORK/sam_ref
  [ -f "$d/phantoms/dataset.json" ] || $ALICE phantom "$d/phantoms" --num "${SAM_REF_CASES:-200}" --seed 1 --small
  $ALICE datalist "$d/phantoms" -o "$d/datalist.json" --val_fraction 0.1
  $ALICE preprocess --data_dir "$d/phantoms" --json_list "$d/datalist.json" --cache_dir "$d/cache" \
    --spacing 2 2 2 --workers "$(nproc)"
  $ALICE sam-train --recipe reference --cache_dir "$d/cache" --json_list "$d/datalist.json" \
    --output_dir "$d/sam" --width "${SAM_REF_WIDTH:-1.0}" --hu_window -200 300 --max_minutes "${SAM_REF_MINUTES:-5}" \
    --workers 8
  rm -rf "$d/val" && mkdir -p "$d/val"  # the held-out cases' cache files, for embed and the sampler
  python3 - "$d/datalist.json" "$d/cache" "$d/val" <<'EOF'
import json, os, sys
from pathlib import Path
for item in json.load(open(sys.argv[1]))["validation"]:
    stem = Path(item["image"]).name.split(".")[0]
    for ext in (".npy", ".json"):
        os.symlink(Path(sys.argv[2]).resolve() / (stem + ext), Path(sys.argv[3]) / (stem + ext))
EOF
  $ALICE embed --cache_dir "$d/val" --sam_checkpoint "$d/sam/sam.safetensors" --embed_dir "$d/embed" --force
  cp "$d/sam/log.jsonl" "$OUT/sam_reference_log.jsonl"
  for search in global coarse; do
    $ALICE sam-eval --embed_dir "$d/embed" --landmarks "$d/phantoms/landmarks" --search $search \
      --json "$OUT/sam_reference_$search.json"
  done
  python3 benchmarks/sampler.py --cache_dir "$d/val" --embed_dir "$d/embed" --landmarks "$d/phantoms/landmarks" \
    --work_dir "$d/sampler" --json "$OUT/sam_reference_sampler.json"
}

export OUT SAM WORK STEPS PRESET ROI ALICE
export -f info data train embed_full sam_reference
stage info 60 info
stage kernel_tests 180 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py
stage kernels 180 python3 benchmarks/kernels.py --dtype bfloat16 --json "$OUT/kernels_bf16.json"
stage data 240 data
stage train 300 train
stage throughput 300 python3 benchmarks/throughput.py --preset "$PRESET" --roi "$ROI" --bf16 --batch_size 2 \
  --zero 1 2 3 --steps 5 --num_workers 8 --baseline reference --work_dir "$WORK/throughput" --json "$OUT/throughput.json"
stage sdpa 120 python3 benchmarks/sdpa_windows.py --preset "$PRESET" --roi "$ROI" --json "$OUT/sdpa_windows.json"
stage backbone 150 python3 benchmarks/backbone.py --feature_size 48 --roi 96 --batch 2 --bf16 --repeats 5 \
  --json "$OUT/backbone_f48_bf16.json"
stage backbone 120 python3 benchmarks/backbone.py --feature_size 24 --roi 96 --repeats 5 --json "$OUT/backbone_f24_fp32.json"
stage embed_full 120 embed_full
stage sampler 180 python3 benchmarks/sampler.py --num_cases 2 --pairs 8 --baseline_pairs 1 --repeats 2 \
  --work_dir "$WORK/sampler" --json "$OUT/sampler.json"
stage kernels_fp32 180 python3 benchmarks/kernels.py --json "$OUT/kernels_fp32.json"
stage max_size 600 python3 benchmarks/max_size.py --presets B L H --roi "$ROI" --zero 2 3 --bf16 --max_batch 16 \
  --timeout 120 --work_dir "$WORK/max_size" --json "$OUT/max_size.json"
stage sam_reference 590 sam_reference
echo "== done $(date -u +%FT%TZ)"
