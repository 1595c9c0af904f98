#!/usr/bin/env bash
# Runs the two long MNIST studies side by side on one 2-core machine, one sitting at a time:
# the objectives study (BENCHMARKS.md section 8) with priority and the recipe study (section 14)
# as a scavenger on what it leaves idle. Both skip every run whose result file exists and resume a
# run cut off by the end of a sitting, so the same command continues them in the next sitting.
#
#   bash benchmarks/run_studies.sh [--calibrate] [--no_objectives] [--no_recipe]
#
# --calibrate first measures the timed recipe variants' step times with the machine to itself
# (recipe_study.py --calibrate_only, ~25 min on a 80 GFLOP/s machine); the timed variants run
# only with those (--require_calibrated), the cost-neutral ones need none. The measurements are
# kept in $STUDY_RESULTS/recipe_study/screen/calibration/ too: commit them, and later sittings on
# new machines need no quiet spell.
# Why autogroup: a process started under setsid is in an autogroup of its own, and the kernel
# shares the CPU between autogroups before it looks at a process's nice value; the scavenger sets
# its autogroup's nice to 19 (measured: the objectives run then gets ~165 % of 200 % CPU).
#
# Environment: STUDY_RESULTS (default benchmarks/results of this checkout; point it at the
# checkout you commit from when running from a worktree), STUDY_WORK (default runs/), STUDY_LOGS
# (default runs/study_logs). Stop: kill the process groups (training saves on SIGTERM).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS="${STUDY_RESULTS:-$ROOT/benchmarks/results}"
WORK="${STUDY_WORK:-$ROOT/runs}"
LOGS="${STUDY_LOGS:-$WORK/study_logs}"
PYTHON="${PYTHON:-python}"
mkdir -p "$LOGS"
cd "$ROOT" || exit 1

calibrate=0 objectives=1 recipe=1
for arg in "$@"; do
  case $arg in
    --calibrate) calibrate=1 ;;
    --no_objectives) objectives=0 ;;
    --no_recipe) recipe=0 ;;
    *) echo "run_studies.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

# The recipe screen: the default at seeds 0 and 1 (the second measures the screen's noise), the
# sampling variants of its run, then the variants whose step costs the default's (their budget
# needs no timing), then the timed ones.
mapfile -t RECIPE_SAMPLING < <("$PYTHON" benchmarks/recipe_study.py --list --kind sampling)
mapfile -t RECIPE_NEUTRAL < <("$PYTHON" benchmarks/recipe_study.py --list --kind neutral)
mapfile -t RECIPE_TIMED < <("$PYTHON" benchmarks/recipe_study.py --list --kind timed)
if ((${#RECIPE_NEUTRAL[@]} == 0 || ${#RECIPE_TIMED[@]} == 0)); then
  echo "run_studies.sh: recipe_study.py --list --kind failed (is the virtual environment active?)" >&2
  exit 1
fi
recipe_study() {
  "$PYTHON" benchmarks/recipe_study.py --phase screen --workdir "$WORK/recipe_study" \
    --results_dir "$RESULTS/recipe_study" "$@"
}

# One cache of reference features for both studies (same keys, files written atomically): the FID
# reference alone is 5,000 Inception passes (over 40 min at a scavenger's share of a machine whose
# float32 matmul ran 210 GFLOP/s alone).
mkdir -p "$WORK/objectives_study/mnist/feature_cache" "$WORK/recipe_study"
if [[ ! -e $WORK/recipe_study/reference_cache ]]; then
  ln -s "$WORK/objectives_study/mnist/feature_cache" "$WORK/recipe_study/reference_cache"
fi

if ((calibrate)); then
  recipe_study --calibrate_only --only "${RECIPE_TIMED[@]}" > "$LOGS/calibration.log" 2>&1
fi

if ((objectives)); then
  setsid nice -n 5 "$PYTHON" benchmarks/objectives_study.py --suite mnist \
    --workdir "$WORK/objectives_study" --results_dir "$RESULTS/objectives/mnist" \
    >> "$LOGS/objectives_mnist.log" 2>&1 &
  echo "objectives study: pid $!, log $LOGS/objectives_mnist.log"
fi

if ((recipe)); then
  export -f recipe_study
  export PYTHON WORK RESULTS
  setsid bash -c '
    echo 19 > /proc/self/autogroup || true
    recipe_study --seeds 0 1 --only default
    for variant in "$@"; do recipe_study --only "$variant"; done
  ' recipe "${RECIPE_SAMPLING[@]}" "${RECIPE_NEUTRAL[@]}" >> "$LOGS/recipe_screen.log" 2>&1 &
  recipe_pid=$!
  echo "recipe study: pid $recipe_pid, log $LOGS/recipe_screen.log"
  # The timed variants, each only if its step times were measured in a quiet spell.
  setsid bash -c '
    echo 19 > /proc/self/autogroup || true
    while kill -0 "$0" 2>/dev/null; do sleep 30; done
    for variant in "$@"; do recipe_study --require_calibrated --only "$variant"; done
  ' "$recipe_pid" "${RECIPE_TIMED[@]}" >> "$LOGS/recipe_screen.log" 2>&1 &
fi
