#!/usr/bin/env bash
# The paper's design-space study (section 3.2: Tables 1, 2, 6, Figures 3 and 4) rerun on the toy teacher:
# every design distilled at one budget (same steps, batch and seed), then bench.py times each design and
# study.py writes one JSON per run (results + CPU latency), the sweep table and the Figure 4 plot.
#
#   bash study.sh            # 26 runs of 300 steps x batch 32, then the timing: ~1.5 h on 2 CPU cores
#   WITH_5M=1 bash study.sh  # + Table 6's three 5M designs: RESULTS.md's numbers, ~2 h on 2 CPU cores
#   STEPS=4000 BATCH=128 JOBS=8 WITH_5M=1 OUT=runs/study_gpu RESULTS=results/toy_gpu bash study.sh --toy-pairs 100000
#
# Interrupt it (Ctrl-C) and run the same command again: finished runs are skipped, a stopped one resumes
# from its checkpoint. Settings (environment): STEPS, BATCH, SEED; OUT (run folders), RESULTS (JSONs, table,
# plot); JOBS (runs at once, for a GPU); WITH_5M=1 adds Table 6's 5M rows; ONLY="name ..." runs a subset;
# BENCH_DEVICE, BENCH_MODES, BENCH_N: the latency measurement; PYTHON (default python). Extra arguments go
# to every distill.py run.
set -euo pipefail
cd "$(dirname "$0")"
STEPS=${STEPS:-300} BATCH=${BATCH:-32} SEED=${SEED:-0} JOBS=${JOBS:-1} WITH_5M=${WITH_5M:-0}
OUT=${OUT:-runs/study} RESULTS=${RESULTS:-results/toy} ONLY=${ONLY:-}
BENCH_DEVICE=${BENCH_DEVICE:-cpu} BENCH_MODES=${BENCH_MODES:-lut} BENCH_N=${BENCH_N:-256} PYTHON=${PYTHON:-python}

die() { echo "error: $*" >&2; exit 2; }  # bad settings: one message, exit code 2, before any work
for var in STEPS BATCH JOBS BENCH_N; do
  [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var=${!var} must be a positive integer (e.g. $var=300)."
done
[[ $SEED =~ ^[0-9]+$ ]] || die "SEED=$SEED must be an integer >= 0."
[[ $WITH_5M == 0 || $WITH_5M == 1 ]] || die "WITH_5M=$WITH_5M must be 0 or 1 (1 adds Table 6's 5M designs)."
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not a program here; point it at the Python of the" \
  "environment that has requirements.txt installed."

# d w h loss [seed]. A design shared by several tables runs once ((6,128,4) is the centre of all of Fig. 3);
# a seed other than SEED marks a repeat that measures the run-to-run spread.
RUNS=(
  "1 128 8 l2"  "2 96 8 l2"  "5 64 4 l2"  "5 64 8 l2"  "9 48 6 l2"  "21 32 4 l2"  # Table 2, 0.42M
  "3 192 12 l2"  "7 128 8 l2"  "13 96 8 l2"                                         # Table 6, 2.2M
  "2 128 4 l2"  "4 128 4 l2"  "6 128 4 l2"  "8 128 4 l2"  "12 128 4 l2"             # Fig. 3a: depth, w=128 h=4
  "6 32 4 l2"  "6 64 4 l2"  "6 96 4 l2"  "6 192 4 l2"                               # Fig. 3b: width, d=6 h=4
  "6 128 1 l2"  "6 128 2 l2"  "6 128 8 l2"  "6 128 16 l2"  "6 128 32 l2"            # Fig. 3c: heads, d=6 w=128
  "5 64 8 l1"                                                                       # Table 1: L1 beside L2
  "5 64 8 l2 1"  "5 64 8 l2 2"                                                      # spread: seeds 1, 2
)
[ "$WITH_5M" = 1 ] && RUNS+=("4 256 16 l2" "16 128 8 l2" "7 192 12 l2")            # Table 6, 5M
run_name() { echo "d$1w$2h$3_$4${5:+_s$5}"; }                # d w h loss [seed] -> the run's folder name
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }  # NAME: is it in ONLY (or ONLY unset)?
names=" "; for r in "${RUNS[@]}" "5 64 8 lpips"; do names+="$(run_name $r) "; done
for name in $ONLY; do
  [[ $names == *" $name "* ]] || die "ONLY names an unknown run '$name'; the runs are:$names"
done
for dir in "$OUT" "$RESULTS"; do
  mkdir -p "$dir" 2>/dev/null && [ -w "$dir" ] || die "cannot write to the folder $dir; set OUT / RESULTS to a writable folder."
done
# Table 1's LPIPS row needs torchvision's VGG16 weights in the torch hub cache (README: weights and files for offline machines), never a download
if "$PYTHON" -c "import sys, distill; sys.exit(distill.lpips_backbone_file('vgg', download=False) is None)"; then
  RUNS+=("5 64 8 lpips")
else
  echo "study: Table 1's LPIPS row skipped: vgg16-397923af.pth is not in the torch hub cache (README: weights and files for offline machines)"
fi

run_one() {  # "k d w h loss [seed]" [extra distill.py flags]: train OUT/NAME unless it is finished
  local k d w h loss seed; read -r k d w h loss seed <<<"$1"; shift
  local name; name=$(run_name "$d" "$w" "$h" "$loss" "$seed")
  local out="$OUT/$name" tag="study: [$k/$TOTAL] $name" resume=()
  wanted "$name" || return 0
  if [ -f "$out/results.json" ] && grep -q "\"step\": $STEPS," "$out/results.json"; then
    echo "$tag: finished, skipped"; return 0
  fi
  [ -f "$out/ckpt.pt" ] && resume=(--resume)
  echo "$tag: ${resume[*]:-new run}"
  mkdir -p "$out"
  local cmd=("$PYTHON" distill.py --d "$d" --w "$w" --h "$h" --loss "$loss" --steps "$STEPS" --batch "$BATCH"
             --seed "${seed:-$SEED}" --eval-every $(( STEPS / 3 > 0 ? STEPS / 3 : 1 )) --out "$out" "${resume[@]}" "$@")
  if [ "$JOBS" = 1 ]; then
    "${cmd[@]}" 2>&1 | tee -a "$out/log.txt"
  else  # runs at once would interleave their lines: each keeps its own log, one line when it ends
    "${cmd[@]}" >>"$out/log.txt" 2>&1 || { echo "$tag: FAILED, see $out/log.txt"; return 1; }
    echo "$tag: $(grep '^eval step' "$out/log.txt" | tail -1)"
  fi
}
export -f run_name wanted run_one
TOTAL=${#RUNS[@]}
export STEPS BATCH SEED JOBS OUT ONLY TOTAL PYTHON

start=$(date +%s)
specs=(); for i in "${!RUNS[@]}"; do specs+=("$((i + 1)) ${RUNS[i]}"); done
run_one "${specs[0]}" "$@"  # alone: the first run builds the cached toy pairs that the others then share
printf '%s\n' "${specs[@]:1}" | xargs -d '\n' -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {} "$@"
echo "study: training done in $(( ($(date +%s) - start) / 60 )) min; timing every design on $BENCH_DEVICE"

designs=() results=()
for r in "${RUNS[@]}"; do
  read -r d w h loss seed <<<"$r"; name=$(run_name "$d" "$w" "$h" "$loss" "$seed")
  wanted "$name" || continue
  designs+=("$d,$w,$h") results+=("$OUT/$name/results.json")
done
mkdir -p "$RESULTS"
"$PYTHON" bench.py --sweep --device "$BENCH_DEVICE" --modes "$BENCH_MODES" --n "$BENCH_N" --repeats 3 --warmup 1 \
  --designs $(printf '%s\n' "${designs[@]}" | awk '!seen[$0]++') --json "$OUT/timings.json"
"$PYTHON" study.py --timings "$OUT/timings.json" --results "${results[@]}" \
  --sweep-out "$RESULTS/sweep.md" --plot "$RESULTS/tradeoff.png" --runs-out "$RESULTS"
echo "study: done in $(( ($(date +%s) - start) / 60 )) min; results in $RESULTS/"
