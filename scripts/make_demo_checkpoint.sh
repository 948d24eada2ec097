#!/usr/bin/env bash
# Builds the demo checkpoint the project ships, core/assets/hsc-demo-synth.safetensors: a width-0.125
# HSC network (EPS baseline) trained from scratch on the synthetic dataset, on the CPU.
#
#   bash scripts/make_demo_checkpoint.sh [WORK_DIR]      (default WORK_DIR: /tmp/hsc-demo-build)
#
# Steps: `hsc data synth` (200 train / 60 val, seed 0) -> `hsc train` (the README's "whole run on the
# synthetic dataset") -> `hsc infer` + `hsc eval` of the CAMs on val (background-threshold sweep) ->
# the shipped file: final.safetensors re-saved with the sweep's best background threshold as its
# default, weights stored as float16 (loaded into the float32 network: half the size, CAMs within
# ~1e-4) and without the momentum banks (training state only the trainer reads) -> `hsc infer` +
# `hsc eval` of that file's masks, without and with CRF. Reports are left in WORK_DIR; the figures go
# into core/assets/README.md by hand. CPU training is deterministic for the seed, so the weights are
# reproducible; the file's sha256 is not (its metadata holds the creation time and versions).
#
# Environment: DEMO_ITERS (default 1200), DEMO_SEED (default 0). Needs `hsc` on PATH (the project
# installed). Run under `nice` on a shared machine. WORK_DIR is replaced: it must be absent, empty or
# an earlier build's.
set -euo pipefail

work=${1:-/tmp/hsc-demo-build}
iters=${DEMO_ITERS:-1200}
seed=${DEMO_SEED:-0}
repo=$(cd "$(dirname "$0")/.." && pwd)
dest="$repo/core/assets/hsc-demo-synth.safetensors"

if [ -e "$work" ] && [ ! -f "$work/.hsc-demo-build" ] && [ -n "$(ls -A "$work")" ]; then
    echo "refusing to replace $work: not empty and not an earlier build of this script" >&2
    exit 2
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/.hsc-demo-build"
syn="$work/syn"
run="$work/run"

echo "== synthetic dataset -> $syn"
hsc data synth "$syn" --train 200 --val 60 --seed 0 --quiet

echo "== training $iters steps -> $run (log: $work/train.log)"
start=$(date +%s)
hsc train --data "$syn" --out "$run" --width 0.125 --iters "$iters" --batch 8 --crop 112 \
    --resize-long 112 168 --momentum 0.9 --poly-over-run --no-freeze-bn --seed "$seed" \
    --save-every "$iters" >"$work/train.log" 2>&1
echo "training took $(($(date +%s) - start)) s"

echo "== CAMs on val and the background-threshold sweep"
hsc infer --checkpoint "$run/final.safetensors" --data "$syn" --split val --out "$work/pred" \
    --no-heatmaps --quiet
hsc eval --data "$syn" --split val --cams "$work/pred/cams" --json "$work/report_cams.json" \
    --plot "$work/curve.png"
hsc eval --data "$syn" --split val --masks "$work/pred/masks" --json "$work/report_masks_t022.json"

echo "== the shipped file -> $dest"
python - "$run/final.safetensors" "$work/report_cams.json" "$dest" <<'EOF'
import dataclasses
import json
import sys

from hsc.model.checkpoint import load_checkpoint, save_checkpoint

src, report, dest = sys.argv[1:4]
best = round(float(json.load(open(report))["best_threshold"]), 2)
ck = load_checkpoint(src)
info = dataclasses.replace(ck.info, bg_threshold=best)
extra = {
    "demo": "hsc-demo-synth: width-0.125 HSC trained from scratch on the synthetic dataset "
    "(hsc data synth --train 200 --val 60 --seed 0) by scripts/make_demo_checkpoint.sh; "
    "bg_threshold = best of the val sweep; float16 weights; for trying the service, not for real images",
}
sha = save_checkpoint(dest, ck.net.half(), info=info, train_config=ck.train_config, step=ck.step, extra=extra)
print(f"bg_threshold {best}; sha256 {sha}")
EOF
chmod 0644 "$dest"

echo "== masks of the shipped file on val, without and with CRF"
hsc infer --checkpoint "$dest" --data "$syn" --split val --out "$work/pred_best" --no-heatmaps --quiet
hsc eval --data "$syn" --split val --masks "$work/pred_best/masks" --json "$work/report_masks_best.json"
hsc infer --checkpoint "$dest" --data "$syn" --split val --out "$work/pred_crf" --crf --no-heatmaps --quiet
hsc eval --data "$syn" --split val --masks "$work/pred_crf/masks" --json "$work/report_masks_crf.json"

ls -l "$dest"
sha256sum "$dest"
