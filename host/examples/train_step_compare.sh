#!/usr/bin/env bash
# Runs the candle bench (modes: `candle` = candle's convolutions and batch norm,
# `fast-oldbn` = fast convolutions with candle's batch norm, `fast` = fast convolutions
# and the fused batch norm + ReLU) and the PyTorch peer side by side, one (alpha, size)
# at a time and interleaved, so that machine load hits every side alike; prints the
# step-time table and the ratios ccnet / PyTorch.
#
#   host/examples/train_step_compare.sh [alphas] [sizes] [iters]      (WARMUP=2 steps first)
#   host/examples/train_step_compare.sh 1/16,1/8,1/4 128,256 3
#   MODES=fast host/examples/train_step_compare.sh 1/8 256 3     # only some candle modes
#
# Needs python3 with torch (CPU); without it only old-vs-new candle is printed.
# Uses CARGO_TARGET_DIR if set. Threads: 2 for both (RAYON_NUM_THREADS, torch.set_num_threads).
# CANDLE_NUM_THREADS defaults to 1: candle's element-wise ops then run on the calling
# thread instead of its spin-waiting barrier pool (2.5x faster steps on the loaded 2-core
# machine, see docs/training.md); matmuls and the im2col/col2im ops still use 2 threads.
# Set CANDLE_NUM_THREADS=2 to measure candle's default. Likewise OMP_WAIT_POLICY defaults
# to PASSIVE for PyTorch: its OpenMP workers otherwise spin at every barrier, which on the
# loaded machine made a step 10-25x slower (3.3 s instead of 0.13-0.39 s at alpha 1/16, 128).
# THREADS=1 compares both sides single-threaded (the least load-sensitive setting).
set -euo pipefail
cd "$(dirname "$0")/../.."
alphas=${1:-1/16,1/8,1/4}
sizes=${2:-128,256}
iters=${3:-3}
warmup=${WARMUP:-2}
threads=${THREADS:-2}
modes=${MODES:-candle,fast-oldbn,fast}
export RAYON_NUM_THREADS=$threads
export CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-1}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
echo "# threads $threads, CANDLE_NUM_THREADS=$CANDLE_NUM_THREADS, OMP_WAIT_POLICY=$OMP_WAIT_POLICY, iters $iters after $warmup warm-up, modes $modes"
cargo build --release -q -p ccnet-host --example train_step_bench
bin=${CARGO_TARGET_DIR:-target}/release/examples/train_step_bench
have_torch=0
python3 -c "import torch" 2>/dev/null && have_torch=1
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for a in ${alphas//,/ }; do
  for s in ${sizes//,/ }; do
    for what in train infer; do
      "$bin" --alphas "$a" --sizes "$s" --iters "$iters" --warmup "$warmup" --what "$what" --modes "$modes" | grep '^bench' | tee -a "$out"
      if [ $have_torch = 1 ]; then
        python3 host/examples/train_step_peer.py --alphas "$a" --sizes "$s" --iters "$iters" --warmup "$warmup" \
          --what "$what" --threads "$threads" | grep '^bench' | tee -a "$out"
      fi
    done
  done
done
echo
python3 - "$out" <<'EOF'
import re, sys
t = {}
for line in open(sys.argv[1]):
    m = dict(kv.split("=") for kv in line.split()[2:])
    t[(line.split()[1], m["alpha"], m["size"], m["mode"])] = float(m["ms"])
rows = sorted({k[:3] for k in t}, key=lambda k: (k[0] != "train", eval(k[1]), int(k[2])))
modes = ["candle", "fast-oldbn", "fast"]
print("| step | alpha | size | candle ms | fast-oldbn ms | fast ms | torch ms | candle/torch | fast-oldbn/torch | fast/torch | fast-oldbn/fast |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for w, a, s in rows:
    c, o, f, p = (t.get((w, a, s, m)) for m in modes + ["torch"])
    r = lambda x, y: f"{x / y:.2f}" if x and y else "-"
    ms = lambda x: f"{x:.0f}" if x else "-"
    print(f"| {w} | {a} | {s} | {ms(c)} | {ms(o)} | {ms(f)} | {ms(p)} | {r(c, p)} | {r(o, p)} | {r(f, p)} | {r(o, f)} |")
EOF
