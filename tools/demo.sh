#!/usr/bin/env bash
# The CPU demo: generate the synthetic shapes dataset (once), train the demo preset, then
# evaluate the one trained model at several poll ratios and print the AP table.
# DATA and OUT override where the dataset and the run live.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo}
if [ ! -f "$DATA/annotations/instances_val2017.json" ]; then
    python -m datasets.synthetic --out "$DATA" --num_train 2000 --num_val 200 --image_size 160 --seed 0
fi
python main.py --config configs/demo.yaml --coco_path "$DATA" --output_dir "$OUT"
python main.py --config configs/demo.yaml --coco_path "$DATA" --output_dir "$OUT" \
    --eval --eval_ratios 0.33 0.5 0.65 0.8 1.0
