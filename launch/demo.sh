#!/usr/bin/env bash
# `make demo`: the whole pipeline on built-in phantom data, end to end, in work/demo.
set -euo pipefail
W=${DEMO_DIR:-work/demo}
mkdir -p "$W"
alice-ds phantom "$W/phantoms" --num 4 --seed 0
alice-ds datalist "$W/phantoms" -o "$W/datalist.json"
alice-ds preprocess --data_dir "$W/phantoms" --json_list "$W/datalist.json" --cache_dir "$W/cache"
