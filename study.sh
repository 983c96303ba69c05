#!/usr/bin/env bash
# The paper's design-space study (section 3.2: Tables 1, 2, 6, Figures 3 and 4) rerun on the toy teacher:
# every design distilled with one recipe (same steps, batch, lr schedule, loss and seed), then bench.py times
# each design and study.py writes one JSON per run (results + CPU latency), the sweep table and the Figure 4 plot.
#
#   bash study.sh             # the 11 headline runs (below) of 1,200 steps x batch 128, two at a time, then the
#                             # timing: 8 min on one H200 with JOBS=10 BENCH_DEVICE=cuda; 12-13 h on 2 CPU cores
#   BATCH=32 bash study.sh    # a cheaper recipe (about a quarter of the time); its records are not the headline's
#   ALL=1 bash study.sh       # and Tables 2 and 6's other designs and Figure 3's sweeps: 33 runs
#   WITH_5M=0 bash study.sh   # without the 5M designs
#   STEPS=4000 JOBS=3 BENCH_DEVICE=cuda OUT=runs/study_long RESULTS=results/long bash study.sh
#                             # longer training (a GPU's: one run 3.5-5.5 min on an H200)
#
# Interrupt it (Ctrl-C) and run the same command again: finished runs are skipped, a stopped one resumes from its
# last checkpoint (every EVERY steps, and at the interrupt); runs trained with another recipe (batch, lr, warm-up,
# decay, clip, seed) stop it with a message. A run's record in RESULTS (RESULTS/NAME.json, as committed) counts as
# finished when OUT lacks the run, so a fresh clone goes on where the committed records end. Settings (environment):
# STEPS, BATCH, LR, WARMUP (learning-rate warm-up steps), DECAY (final steps over which the rate falls linearly to 0;
# default 400, as distill.py's toy default), CLIP (gradient-norm clip, 0: off), SEED, EVERY
# (steps between evaluations and checkpoints, default 200), LOSS (every design's loss; Table 1 adds l1 and l2 beside
# it); OUT (run folders), RESULTS (JSONs, table, plots); JOBS (runs at once; each gets cores/JOBS torch threads
# unless OMP_NUM_THREADS is set); ALL=1 adds the other designs; WITH_5M=0 drops the 5M rows; ONLY="name ..." runs a
# subset (any of the runs); BENCH_DEVICE, BENCH_MODES, BENCH_N: the latency measurement; PYTHON (default python).
# Extra arguments go to every distill.py run. The report (timing, records, table, plots) covers every run of the
# study finished at STEPS (in OUT or by its record), so a later call with ONLY or ALL=1 adds its runs to the table.
set -euo pipefail
cd "$(dirname "$0")"
STEPS=${STEPS:-1200} BATCH=${BATCH:-128} LR=${LR:-2e-3} WARMUP=${WARMUP:-100} DECAY=${DECAY:-400} CLIP=${CLIP:-1}
SEED=${SEED:-0}
EVERY=${EVERY:-200}
JOBS=${JOBS:-2} WITH_5M=${WITH_5M:-1} ALL=${ALL:-0} LOSS=${LOSS:-toy-lpips}
OUT=${OUT:-runs/study} RESULTS=${RESULTS:-results/toy} ONLY=${ONLY:-}
BENCH_DEVICE=${BENCH_DEVICE:-cpu} BENCH_MODES=${BENCH_MODES:-lut} BENCH_N=${BENCH_N:-256} PYTHON=${PYTHON:-python}

die() { echo "error: $*" >&2; exit 2; }  # bad settings: one message, exit code 2, before any work
for var in STEPS BATCH JOBS BENCH_N EVERY; do
  [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var=${!var} must be a positive integer (e.g. $var=300)."
done
for var in WARMUP DECAY; do  # steps of the rate's warm-up at the start and linear fall to 0 at the end
  [[ ${!var} =~ ^[0-9]+$ ]] || die "$var=${!var} must be an integer >= 0 (a number of steps; 0: none)."
done
for var in LR CLIP; do  # plain decimal or e-notation numbers; distill.py checks the range
  [[ ${!var} =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "$var=${!var} must be a number (e.g. LR=2e-3, CLIP=1)."
done
[[ $SEED =~ ^[0-9]+$ ]] || die "SEED=$SEED must be an integer >= 0."
[[ $WITH_5M == 0 || $WITH_5M == 1 ]] || die "WITH_5M=$WITH_5M must be 0 or 1 (0 drops Table 6's 5M designs)."
[[ $ALL == 0 || $ALL == 1 ]] || die "ALL=$ALL must be 0 or 1 (1 adds Tables 2 and 6's other designs and Figure 3)."
[[ $LOSS =~ ^(l1|l2|lpips|toy-lpips)$ ]] || die "LOSS=$LOSS must be one of l1, l2, lpips, toy-lpips (distill.py --loss)."
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not a program here; point it at the Python of the" \
  "environment that has requirements.txt installed."

# d w h loss [seed]; a seed other than SEED marks a repeat that measures the run-to-run spread. CORE: the
# paper's headline comparisons, Table 1's three losses and Table 6's proposed design of each size (0.42M,
# 2.2M, 5M), each design three seeds, longest first after the one that builds the caches. REST (ALL=1): the
# other designs of Tables 2 and 6 and Figure 3's sweeps; a design shared by several runs once ((6,128,4) is
# the centre of all of Fig. 3).
L=$LOSS
CORE=("5 64 8 $L")
[ "$WITH_5M" = 1 ] && CORE+=("7 192 12 $L" "7 192 12 $L 1" "7 192 12 $L 2")                # Table 6, 5M
CORE+=(
  "7 128 8 $L"  "7 128 8 $L 1"  "7 128 8 $L 2"                                      # Table 6, 2.2M
  "5 64 8 $L 1"  "5 64 8 $L 2"                                                      # Table 6, 0.42M: seeds
  "5 64 8 l1"  "5 64 8 l2"                                                          # Table 1: L1, L2 beside LOSS
)
REST=(
  "1 128 8 $L"  "2 96 8 $L"  "5 64 4 $L"  "9 48 6 $L"  "21 32 4 $L"                 # Table 2, 0.42M
  "3 192 12 $L"  "13 96 8 $L"                                                       # Table 6, 2.2M
  "2 128 4 $L"  "4 128 4 $L"  "6 128 4 $L"  "8 128 4 $L"  "12 128 4 $L"             # Fig. 3a: depth, w=128 h=4
  "6 32 4 $L"  "6 64 4 $L"  "6 96 4 $L"  "6 192 4 $L"                               # Fig. 3b: width, d=6 h=4
  "6 128 1 $L"  "6 128 2 $L"  "6 128 8 $L"  "6 128 16 $L"                          # Fig. 3c: heads, d=6 w=128
)
[ "$WITH_5M" = 1 ] && REST+=("4 256 16 $L" "16 128 8 $L")                           # Table 6, 5M
RUNS=("${CORE[@]}")
if [ "$ALL" = 1 ] || [ -n "$ONLY" ]; then RUNS+=("${REST[@]}"); fi  # ONLY may name any run
run_name() { echo "d$1w$2h$3_$4${5:+_s$5}"; }                # d w h loss [seed] -> the run's folder name
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }  # NAME: is it in ONLY (or ONLY unset)?
result_of() {  # NAME -> its results: the run folder's, else its record in RESULTS (committed with the repo)
  if [ -f "$OUT/$1/results.json" ]; then echo "$OUT/$1/results.json"
  elif [ -f "$RESULTS/$1.json" ]; then echo "$RESULTS/$1.json"; fi
}
finished() { local f; f=$(result_of "$1"); [ -n "$f" ] && grep -q "\"step\": $STEPS," "$f"; }  # NAME: done?
names=" "; for r in "${RUNS[@]}"; do names+="$(run_name $r) "; done
for name in $ONLY; do
  [[ $names == *" $name "* ]] || die "ONLY names an unknown run '$name'; the runs are:$names"
done
for dir in "$OUT" "$RESULTS"; do
  mkdir -p "$dir" 2>/dev/null && [ -w "$dir" ] || die "cannot write to the folder $dir; set OUT / RESULTS to a writable folder."
done
# OUT's runs must share this study's recipe: one trained with another would be skipped as finished (its
# scores not comparable) or continued under a recipe that is neither (distill.py --resume refuses that too).
# The step count may differ: a shorter run continues to STEPS. Checked for every run folder, before any work.
trained=()
for r in "${CORE[@]}" "${REST[@]}"; do
  read -r d w h loss seed <<<"$r"; name=$(run_name "$d" "$w" "$h" "$loss" "$seed")
  f=$(result_of "$name"); [ -n "$f" ] && trained+=("$f" "${seed:-$SEED}")
done
if [ ${#trained[@]} -gt 0 ]; then
  other=$("$PYTHON" - "$BATCH" "$LR" "$WARMUP" "$CLIP" "$DECAY" "${trained[@]}" <<'EOF'
import json, sys
batch, lr, warmup, clip, decay, files = (int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                        int(sys.argv[5]), sys.argv[6:])
other = []
for path, seed in zip(files[::2], files[1::2]):
    try:
        run = json.load(open(path))
    except (OSError, ValueError):
        other.append(f"{path} (unreadable)"); continue
    recipe = dict(batch=batch, lr=lr, warmup=warmup, grad_clip=clip, decay=decay, seed=int(seed))
    diff = [f"{k} {run[k]}" for k, v in recipe.items() if k in run and run[k] != v]
    if diff:
        other.append(f"{path} ({', '.join(diff)})")
if other:  # the first three, and how many more
    print("; ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else ""))
EOF
  )
  [ -z "$other" ] || die "runs in $OUT were trained with another recipe than this study's (batch $BATCH, lr $LR," \
    "warm-up $WARMUP, decay $DECAY, clip $CLIP, seed $SEED): $other. Their scores" \
    "would not compare with this recipe's. Set OUT and RESULTS to fresh folders for this recipe (e.g." \
    "OUT=runs/study_b$BATCH RESULTS=results/toy_b$BATCH), or the settings those runs were trained with."
fi
# runs at once must not oversubscribe the cores: each gets its share of torch threads (the timing, its own)
THREADS=${OMP_NUM_THREADS:-$(( $(nproc 2>/dev/null || echo "$JOBS") / JOBS ))}
[ "$THREADS" -ge 1 ] 2>/dev/null || THREADS=1
run_one() {  # "k d w h loss [seed]" [extra distill.py flags]: train OUT/NAME unless it is finished
  local k d w h loss seed; read -r k d w h loss seed <<<"$1"; shift
  local name; name=$(run_name "$d" "$w" "$h" "$loss" "$seed")
  local out="$OUT/$name" tag="study: [$k/$TOTAL] $name" resume=()
  wanted "$name" || return 0
  if finished "$name"; then
    echo "$tag: finished, skipped"; return 0
  fi
  [ -f "$out/ckpt.pt" ] && resume=(--resume)
  echo "$tag: ${resume[*]:-new run}"
  mkdir -p "$out"
  local cmd=(env OMP_NUM_THREADS="${RUN_THREADS:-$THREADS}" "$PYTHON" distill.py --d "$d" --w "$w" --h "$h"
             --loss "$loss" --steps "$STEPS" --batch "$BATCH" --lr "$LR" --warmup "$WARMUP" --grad-clip "$CLIP"
             --decay "$DECAY" --seed "${seed:-$SEED}" --eval-every "$EVERY" --out "$out" "${resume[@]}" "$@")
  if [ "$JOBS" = 1 ]; then
    "${cmd[@]}" 2>&1 | tee -a "$out/log.txt"
  else  # runs at once would interleave their lines: each keeps its own log, one line when it ends
    "${cmd[@]}" >>"$out/log.txt" 2>&1 || { echo "$tag: FAILED, see $out/log.txt"; return 1; }
    echo "$tag: $(grep '^eval step' "$out/log.txt" | tail -1)"
  fi
}
export -f run_name wanted result_of finished run_one
TOTAL=${#RUNS[@]}
export STEPS BATCH LR WARMUP DECAY CLIP SEED EVERY JOBS OUT RESULTS ONLY TOTAL PYTHON THREADS

start=$(date +%s)
specs=(); for i in "${!RUNS[@]}"; do specs+=("$((i + 1)) ${RUNS[i]}"); done
# alone, on every core: the first run builds the cached toy pairs and toy networks that the others then share
RUN_THREADS=${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 1)} run_one "${specs[0]}" "$@"
printf '%s\n' "${specs[@]:1}" | xargs -d '\n' -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {} "$@"
echo "study: training done in $(( ($(date +%s) - start) / 60 )) min; timing every design on $BENCH_DEVICE"

designs=() results=()
for r in "${CORE[@]}" "${REST[@]}"; do  # this call's runs and any others finished earlier (OUT or RESULTS)
  read -r d w h loss seed <<<"$r"; name=$(run_name "$d" "$w" "$h" "$loss" "$seed")
  finished "$name" || continue
  designs+=("$d,$w,$h") results+=("$(result_of "$name")")
done
mkdir -p "$RESULTS"
"$PYTHON" bench.py --sweep --device "$BENCH_DEVICE" --modes "$BENCH_MODES" --n "$BENCH_N" --repeats 3 --warmup 1 \
  --designs $(printf '%s\n' "${designs[@]}" | awk '!seen[$0]++') --json "$OUT/timings.json"
"$PYTHON" study.py --timings "$OUT/timings.json" --results "${results[@]}" \
  --sweep-out "$RESULTS/sweep.md" --plot "$RESULTS/tradeoff.png" --guidance-plot "$RESULTS/guidance.png" \
  --runs-out "$RESULTS"
echo "study: done in $(( ($(date +%s) - start) / 60 )) min; results in $RESULTS/"
