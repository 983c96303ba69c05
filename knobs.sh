#!/usr/bin/env bash
# The paper's open design knobs (its conclusion: "knobs like MLP ratio ... custom attention heads for each
# layer") tried on the toy teacher at the 0.42M design: heads per block and the MLP ratio, three seeds each, every
# run at distill.py's toy recipe (the quick start's: 900 steps at batch 16), then each design's CPU latency and
# one table (study.py's) with the mean and spread over seeds.
#
#   bash knobs.sh     # 15 runs of about 4 min, one at a time, then the timing: about 65 min on 2 CPU cores
#
# The designs: (5,64,8), the rules' 0.42M; the same with 4 heads in every block; with heads halving toward the
# output (8,8,4,4,2); with MLP ratio 2 instead of 4 (fewer parameters); and the rules' design for 0.42M at MLP
# ratio 2, (6,64,8) (python dit.py --params 0.42M --mlp-ratio 2), which spends the saved parameters on a block.
# Interrupt it and run it again: finished runs are skipped, a stopped one resumes. Settings (environment): SEEDS
# (default "0 1 2"), STEPS (900), OUT (run folders, runs/knobs), RESULTS (table and plots, results/knobs), PYTHON.
# Extra arguments go to every distill.py run.
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-0 1 2} OUT=${OUT:-runs/knobs} RESULTS=${RESULTS:-results/knobs} PYTHON=${PYTHON:-python}
STEPS=${STEPS:-900}  # distill.py's toy default, given explicitly so that "finished" below can check it
DESIGNS=("5 64 8 4" "5 64 4 4" "5 64 8,8,4,4,2 4" "5 64 8 2" "6 64 8 2")  # depth width heads mlp-ratio

die() { echo "error: $*" >&2; exit 2; }
[[ $STEPS =~ ^[1-9][0-9]*$ ]] || die "STEPS=$STEPS must be a positive integer (distill.py's toy default: 900)."
for seed in $SEEDS; do [[ $seed =~ ^[0-9]+$ ]] || die "SEEDS=\"$SEEDS\": each seed must be an integer >= 0."; done
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not a program here; point it at the Python of the" \
  "environment that has requirements.txt installed."
for dir in "$OUT" "$RESULTS"; do
  mkdir -p "$dir" 2>/dev/null && [ -w "$dir" ] || die "cannot write to the folder $dir; set OUT / RESULTS to a writable folder."
done

name_of() { local n="d$1w$2h${3//,/-}"; [ "$4" = 4 ] || n+="r$4"; echo "$n"; }  # as dit.design_name writes it
runs=() names=()
for seed in $SEEDS; do for spec in "${DESIGNS[@]}"; do runs+=("$spec $seed"); done; done
for spec in "${DESIGNS[@]}"; do names+=("$(name_of $spec)"); done
start=$(date +%s) k=0
for run in "${runs[@]}"; do
  read -r d w h r seed <<<"$run"; k=$((k + 1))
  out="$OUT/$(name_of "$d" "$w" "$h" "$r")_s$seed" resume=()
  if [ -f "$out/results.json" ] && grep -q "\"step\": $STEPS," "$out/results.json"; then
    echo "knobs: [$k/${#runs[@]}] $out: finished, skipped"; continue
  fi
  [ -f "$out/ckpt.pt" ] && resume=(--resume)
  echo "knobs: [$k/${#runs[@]}] $out: ${resume[*]:-new run} ($(( ($(date +%s) - start) / 60 )) min so far)"
  mkdir -p "$out"
  "$PYTHON" distill.py --d "$d" --w "$w" --h "$h" --mlp-ratio "$r" --seed "$seed" --steps "$STEPS" --out "$out" \
    "${resume[@]}" "$@" >>"$out/log.txt" 2>&1 || die "the run $out failed; its log is $out/log.txt."
  echo "knobs: $(grep '^eval step' "$out/log.txt" | tail -1)"
done
"$PYTHON" bench.py --sweep --device cpu --modes lut --n 256 --repeats 3 --warmup 1 --designs "${names[@]}" \
  --json "$OUT/timings.json"
"$PYTHON" study.py --timings "$OUT/timings.json" --results "$OUT/*/results.json" --sweep-out "$RESULTS/knobs.md" \
  --plot "$RESULTS/tradeoff.png" --guidance-plot "$RESULTS/guidance.png"
echo "knobs: done in $(( ($(date +%s) - start) / 60 )) min; table in $RESULTS/knobs.md"
