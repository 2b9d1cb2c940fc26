#!/usr/bin/env bash
# The prepared GPU check: run it as it is on a machine with one CUDA GPU,
#     bash tools/gpu_check.sh OUTDIR
# Every step is an existing command (the gpu tests, python -m tools.benchmark, main.py on a tiny
# synthetic dataset) under a timeout, all of them within 8 minutes; each step's output goes to
# OUTDIR/<step>.log, and OUTDIR/gpu_check.json and OUTDIR/gpu_check.md hold every step's exit
# status and time, the benchmark's tables and the evaluation's rows. A step that fails does
# not stop the next ones; the script exits 1 if any failed.
# Without a CUDA device it says so in one line and exits 0. GPU_CHECK_DRY_RUN=1 writes the
# report with every command listed but none run (tests/test_gpu_check.py checks their flags).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
    echo "usage: bash tools/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" != 1 ] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "tools/gpu_check.sh needs a CUDA GPU and this machine has none: nothing to check"
    exit 0
fi
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"

step() {  # step NAME TIMEOUT_S COMMAND...: run COMMAND under the timeout (the timeouts add up to 470 s)
    local name=$1 cap=$2 rc start=$SECONDS
    shift 2
    if [ "$DRY" = 1 ]; then
        rc=dry-run
    else
        echo "== $name (timeout ${cap}s): $*"
        timeout -k 5 "$cap" "$@" > "$OUT/$name.log" 2>&1
        rc=$?
        tail -n 3 "$OUT/$name.log"
    fi
    python - "$name" "$rc" "$((SECONDS - start))" "$cap" "$@" >> "$OUT/steps.jsonl" <<'EOF'
import json, shlex, sys
name, rc, seconds, cap, *command = sys.argv[1:]
print(json.dumps({"step": name, "rc": int(rc) if rc.isdigit() else rc, "seconds": int(seconds),
                  "timeout_s": int(cap), "command": shlex.join(command)}))
EOF
}

DATA=$OUT/data
DEMO=(python main.py --config configs/demo.yaml --coco_path "$DATA" --device cuda --backbone_weights none
      --num_workers 2 --eval_ratios 0.5)
step sync_debug 45 python -m pytest -q -p no:cacheprovider \
    tests/test_detr.py::test_cuda_forward_and_loss_synchronise_only_in_the_matcher
step gpu_tests 60 python -m pytest -q -p no:cacheprovider -m gpu \
    --deselect tests/test_detr.py::test_cuda_forward_and_loss_synchronise_only_in_the_matcher
step benchmark 150 python -m tools.benchmark --device cuda --variants r50 dc5 --dtypes fp32 bf16 --ratios 0.33 \
    --train_batch 4 --output "$OUT/benchmark.json"
step dataset 20 python -m datasets.synthetic --out "$DATA" --num_train 200 --num_val 40 --seed 0
step demo_epoch 45 "${DEMO[@]}" --epochs 1 --output_dir "$OUT/demo"
step demo_epoch_amp 35 "${DEMO[@]}" --epochs 1 --amp --output_dir "$OUT/demo_amp"
step eval_4_ratios 35 "${DEMO[@]}" --eval --resume "$OUT/demo/checkpoint.pth" \
    --eval_ratios 0.33 0.5 0.65 0.8 --flops_images 10 --output_dir "$OUT/eval"
step compile 80 "${DEMO[@]}" --epochs 1 --compile --output_dir "$OUT/compile"

python - "$OUT" <<'EOF'
import json, math, pathlib, sys
out = pathlib.Path(sys.argv[1])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
for s in steps:  # main.py stops on a non-finite loss; the report says so too
    log = out / {"demo_epoch": "demo", "demo_epoch_amp": "demo_amp", "compile": "compile"}.get(s["step"], "-") / "log.txt"
    if log.exists():
        s["finite_losses"] = all(math.isfinite(json.loads(line)["train_loss"]) for line in log.read_text().splitlines())
evaluation = out / "eval" / "eval.json"
report = {"steps": steps, "eval": json.loads(evaluation.read_text()) if evaluation.exists() else None}
bench = out / "benchmark.log"
tables = [line for line in bench.read_text().splitlines() if line.startswith(("|", "R50", "DC5", "evaluation"))] \
    if bench.exists() else []
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
lines = ["| step | exit | seconds | timeout | command |", "|---|---|---|---|---|"]
lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['timeout_s']} | `{s['command']}` |" for s in steps]
if report["eval"]:
    lines += ["", "| ratio | AP | AP50 | GFLOPs | img/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['ratio']} | {r['AP']:.3f} | {r['AP50']:.3f} | {r.get('gflops', 0):.2f} | {r['images_per_s']:.1f} |"
              for r in report["eval"]]
(out / "gpu_check.md").write_text("\n".join(lines + [""] + tables) + "\n")
print(f"written: {out}/gpu_check.json, {out}/gpu_check.md")
EOF
[ "$DRY" = 1 ] || python -c "import json, sys; sys.exit(any(s['rc'] != 0 for s in json.load(open(sys.argv[1]))['steps']))" \
    "$OUT/gpu_check.json"
