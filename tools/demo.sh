#!/usr/bin/env bash
# The CPU demo: generate the synthetic shapes dataset (once), pretrain the backbone on its boxes,
# train PnP-DETR (configs/demo.yaml), then evaluate the one model at poll ratios inside its
# training range U(1/3, 0.8).
# DATA and OUT override where the dataset and the run live. Each step prints its seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo}
took() { echo "$1 took $(( $(date +%s) - $2 ))s"; }
step=$(date +%s)
if [ ! -f "$DATA/annotations/instances_val2017.json" ]; then
    python -m datasets.synthetic --out "$DATA" --num_train 5000 --num_val 200 --seed 0
    took "dataset generation" "$step"
fi
start=$(date +%s)
if [ ! -f "$OUT/backbone.pth" ]; then
    # batch 8, not the preset's 16: per image, the smaller batch learns more (docs/training.md, "The demo recipe")
    python pretrain_backbone.py --config configs/demo.yaml --coco_path "$DATA" --batch_size 8 --steps 1800 \
        --output "$OUT/backbone.pth"
    took "backbone pretraining" "$start"
fi
step=$(date +%s)
python main.py --config configs/demo.yaml --coco_path "$DATA" --output_dir "$OUT" \
    --backbone_weights "$OUT/backbone.pth"
took "PnP-DETR training" "$step"
echo "training (backbone pretraining + detector) took $(( $(date +%s) - start ))s"
step=$(date +%s)
python main.py --config configs/demo.yaml --coco_path "$DATA" --output_dir "$OUT" \
    --backbone_weights "$OUT/backbone.pth" --eval --eval_ratios 0.33 0.5 0.65 0.8
took "evaluation" "$step"
