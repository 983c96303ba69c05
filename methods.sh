#!/usr/bin/env bash
# The paper's two feature-distillation methods, Tables 3 (Teaching Assistant) and 4 (Multi-In-One), rerun on the
# toy teacher at the quick start's recipe (distill.py's toy defaults: 900 steps at batch 16), three seeds each,
# then one table with each row's mean and spread over seeds (study.py --compare-out).
#
#   bash methods.sh                                                # the assistant, then 21 runs, one at a time
#   SEEDS=0 ONLY="t4-1-baseline t4-2-layers-3-6" bash methods.sh   # some rows, one seed
#
# Two at once on one thread each (OMP_NUM_THREADS=1, one call per seed or set of rows) a plain or MI1 run takes 11-14
# min on a 2-core AMD EPYC without AVX-512, a TA run 8.5 min on a 2-core Intel Xeon with AMX; the assistant alone
# takes 73 min on the EPYC, 29 min on the Xeon.
#
# Table 3: a TA helps only if it is better than the student, and the paper's is a bigger model (12,384,12: ten
# times its 2.2M student) trained to convergence. Here the rules' 2.2M design (7,128,8), five times the rules'
# 0.42M student (5,64,8), is distilled first (row t3-0, seed 0) with the study's batch of 128 for 600 steps (lr
# 2e-3, falling to 0 over the last 200): at the student's own recipe a bigger design ends worse than the student
# (the 5M there scores toy FID 205 against the 0.42M's 140). Rows, as (l0, l1, l2) of ta.py: t3-1 the baseline
# (1, 0, 0), plain distill.py; t3-2 the TA only (0, 1, 0); t3-3 the TA and its features (0, 1, 1); t3-4 all three.
# Table 4: the 6-block toy student (6,64,8): t4-1 the baseline, plain distill.py; t4-2 layers (3, 6) at t (0.5, 0);
# t4-3 layers (2, 4, 6) at t (0.66, 0.33, 0).
# Interrupt it and run it again: finished runs are skipped, a stopped one resumes; a run's record in RESULTS
# (RESULTS/NAME_sSEED.json, as committed) counts as finished when OUT lacks the run. Settings (environment): SEEDS
# (default "0 1 2"; empty with a TA row in ONLY: the assistant only), ONLY (rows to run, e.g. "t4-2-layers-3-6"; the
# assistant runs when a TA row is among them), OUT (run folders, runs/methods), RESULTS (the table,
# results/methods), PYTHON. Extra arguments go to every run.
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS-0 1 2} ONLY=${ONLY:-} OUT=${OUT:-runs/methods} RESULTS=${RESULTS:-results/methods}
PYTHON=${PYTHON:-python}
TA="$OUT/t3-0-assistant_s0/ckpt.pt"
ASSISTANT="distill.py --d 7 --w 128 --h 8 --batch 128 --steps 600 --lr 2e-3 --decay 200"
ROWS=(  # folder name (the seed is appended) | script and flags (the quick start's recipe: distill.py's defaults)
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
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }  # ROW: is it in ONLY (or ONLY unset)?
for name in $ONLY; do
  printf '%s\n' "${ROWS[@]}" | grep -q "^$name|" || die "ONLY names an unknown row '$name'; the rows are:" \
    "$(printf '%s\n' "${ROWS[@]}" | cut -d'|' -f1 | tr '\n' ' ')"
done
for dir in "$OUT" "$RESULTS"; do
  mkdir -p "$dir" 2>/dev/null && [ -w "$dir" ] || die "cannot write to the folder $dir; set OUT / RESULTS to a" \
    "writable folder."
done

runs=()  # name | command | seed; the assistant first, when a TA row is wanted
for row in "${ROWS[@]}"; do [[ $row == *"--ta "* ]] && wanted "${row%%|*}" && runs=("t3-0-assistant|$ASSISTANT|0"); done
for seed in $SEEDS; do for row in "${ROWS[@]}"; do wanted "${row%%|*}" && runs+=("$row|$seed"); done; done
start=$(date +%s) k=0
for run in "${runs[@]}"; do
  IFS='|' read -r name command seed <<<"$run"; k=$((k + 1))
  out="$OUT/${name}_s$seed" resume=()
  # the assistant counts as finished only with its checkpoint (the TA rows load it), not by its record
  record="$RESULTS/${name}_s$seed.json"
  if [ -f "$out/done" ] || { [ ! -d "$out" ] && [ "$name" != t3-0-assistant ] && [ -f "$record" ]; }; then
    echo "methods: [$k/${#runs[@]}] $out: finished, skipped"; continue
  fi
  [ -f "$out/ckpt.pt" ] && resume=(--resume)
  echo "methods: [$k/${#runs[@]}] $out: ${resume[*]:-new run} ($(( ($(date +%s) - start) / 60 )) min so far)"
  mkdir -p "$out"
  # shellcheck disable=SC2086  # the command's words split on purpose
  "$PYTHON" $command --seed "$seed" --out "$out" "${resume[@]}" "$@" >>"$out/log.txt" 2>&1 \
    || die "the run $out failed; its log is $out/log.txt."
  touch "$out/done"  # distill.py returned: the run reached its last step
  echo "methods: $(grep '^eval step' "$out/log.txt" | tail -1)"
done
results=()  # every finished run: its folder's results (done: reached its last step), else its record in RESULTS
for f in "$OUT"/t[34]-*_s*/done; do [ -f "$f" ] && results+=("${f%/done}/results.json"); done
for f in "$RESULTS"/t[34]-*_s*.json; do
  [ -f "$f" ] && [ ! -f "$OUT/$(basename "${f%.json}")/done" ] && results+=("$f")
done
[ ${#results[@]} -gt 0 ] || die "no finished run in $OUT or $RESULTS to tabulate."
"$PYTHON" study.py --results "${results[@]}" --compare-out "$RESULTS/methods.md" --runs-out "$RESULTS"
echo "methods: done in $(( ($(date +%s) - start) / 60 )) min; table in $RESULTS/methods.md"
