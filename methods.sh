#!/usr/bin/env bash
# The paper's two feature-distillation methods, Tables 3 (Teaching Assistant) and 4 (Multi-In-One), rerun on the
# toy teacher at the quick start's recipe (distill.py's toy defaults: 900 steps at batch 16), three seeds each,
# then one table with each row's mean and spread over seeds (study.py --compare-out).
#
#   bash methods.sh   # the assistant (~15 min), then 21 runs of 4-8 min, one at a time: ~2.5 h on 2 CPU cores
#
# Table 3: the paper's TA (12,384,12) has about ten times the parameters of its 2.2M student. Here the rules' 5M
# design (7,192,12), distilled first like any student (seed 0, row t3-0), assists the rules' 0.42M student
# (5,64,8): the same ratio at a CPU's cost. Rows, as (l0, l1, l2) of ta.py: t3-1 the baseline (1, 0, 0), plain
# distill.py; t3-2 the TA only (0, 1, 0); t3-3 the TA and its features (0, 1, 1); t3-4 all three (1, 1, 1).
# Table 4: the 6-block toy student (6,64,8): t4-1 the baseline, plain distill.py; t4-2 layers (3, 6) at t (0.5, 0);
# t4-3 layers (2, 4, 6) at t (0.66, 0.33, 0).
# Interrupt it and run it again: finished runs are skipped, a stopped one resumes. Settings (environment): SEEDS
# (default "0 1 2"), OUT (run folders, runs/methods), RESULTS (the table, results/methods), PYTHON. Extra
# arguments go to every run.
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-0 1 2} OUT=${OUT:-runs/methods} RESULTS=${RESULTS:-results/methods} PYTHON=${PYTHON:-python}
STEPS=900  # distill.py's toy default, given explicitly so that "finished" below can check it
TA="$OUT/t3-0-assistant_s0/ckpt.pt"
ROWS=(  # folder name (the seed is appended) | script and flags
  "t3-1-baseline|distill.py --d 5 --w 64 --h 8"
  "t3-2-ta|ta.py --ta $TA --d 5 --w 64 --h 8"
  "t3-3-ta-features|ta.py --ta $TA --d 5 --w 64 --h 8 --feature-weight 1"
  "t3-4-all|ta.py --ta $TA --d 5 --w 64 --h 8 --teacher-weight 1 --feature-weight 1"
  "t4-1-baseline|distill.py --d 6 --w 64 --h 8"
  "t4-2-layers-3-6|mi1.py --d 6 --w 64 --h 8 --layers 3,6 --t 0.5,0"
  "t4-3-layers-2-4-6|mi1.py --d 6 --w 64 --h 8 --layers 2,4,6 --t 0.66,0.33,0"
)

die() { echo "error: $*" >&2; exit 2; }
for seed in $SEEDS; do [[ $seed =~ ^[0-9]+$ ]] || die "SEEDS=\"$SEEDS\": each seed must be an integer >= 0."; done
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not a program here; point it at the Python of the" \
  "environment that has requirements.txt installed."
for dir in "$OUT" "$RESULTS"; do
  mkdir -p "$dir" 2>/dev/null && [ -w "$dir" ] || die "cannot write to the folder $dir; set OUT / RESULTS to a writable folder."
done

runs=("t3-0-assistant|distill.py --d 7 --w 192 --h 12|0")  # name | command | seed; the assistant comes first
for seed in $SEEDS; do for row in "${ROWS[@]}"; do runs+=("$row|$seed"); done; done
start=$(date +%s) k=0
for run in "${runs[@]}"; do
  IFS='|' read -r name command seed <<<"$run"; k=$((k + 1))
  out="$OUT/${name}_s$seed" resume=()
  if [ -f "$out/results.json" ] && grep -q "\"step\": $STEPS," "$out/results.json"; then
    echo "methods: [$k/${#runs[@]}] $out: finished, skipped"; continue
  fi
  [ -f "$out/ckpt.pt" ] && resume=(--resume)
  echo "methods: [$k/${#runs[@]}] $out: ${resume[*]:-new run} ($(( ($(date +%s) - start) / 60 )) min so far)"
  mkdir -p "$out"
  # shellcheck disable=SC2086  # the command's words split on purpose
  "$PYTHON" $command --seed "$seed" --steps "$STEPS" --out "$out" "${resume[@]}" "$@" >>"$out/log.txt" 2>&1 \
    || die "the run $out failed; its log is $out/log.txt."
  echo "methods: $(grep '^eval step' "$out/log.txt" | tail -1)"
done
"$PYTHON" study.py --results "$OUT/t[34]-*_s*/results.json" --compare-out "$RESULTS/methods.md"
echo "methods: done in $(( ($(date +%s) - start) / 60 )) min; table in $RESULTS/methods.md"
