#!/usr/bin/env bash
# Submit multi-node GPU training of shortcut_jax to SLURM.
#
#   launch/slurm_gpu.sh --nodes 4 --gpus-per-node 8 --partition gpu \
#       --config experiments/imagenet256.py --workdir /shared/runs/imagenet256 \
#       --setup 'source ~/venvs/shortcut/bin/activate' -- --config.total_steps=400000
#
# Renders launch/slurm_gpu.sbatch with these values (the #SBATCH header and the settings block),
# saves it next to the job logs in WORKDIR/slurm/ and submits it with sbatch. --dry-run prints the
# sbatch command and the rendered script and submits nothing. Resubmitting the same command
# resumes from the newest checkpoint in WORKDIR. See launch/README.md and --help.
set -euo pipefail

PROG=$(basename "$0")
LAUNCH_DIR=$(cd "$(dirname "$0")" && pwd)
TEMPLATE=$LAUNCH_DIR/slurm_gpu.sbatch

usage() {
  cat <<EOF
Usage: $PROG --config FILE --workdir /SHARED/PATH [options] [-- MAIN_ARGS...]

Submit an sbatch job that runs, once per node (each process owns all the GPUs of its node),
  srun python -m shortcut_jax.main --config FILE --workdir /SHARED/PATH --distributed MAIN_ARGS...
jax.distributed.initialize() finds the other nodes from the SLURM_* variables of the job step.

Job shape (every flag falls back to the environment variable in brackets):
  --nodes N                  number of nodes [SHORTCUT_NODES]; default 1
  --gpus-per-node G          GPUs per node [SHORTCUT_GPUS_PER_NODE]; default 8; TYPE:G works too
  --cpus-per-task C          CPU cores for each node's process (data pipeline)
                             [SHORTCUT_CPUS_PER_TASK]; default 16
  --time HH:MM:SS            wall-clock limit [SHORTCUT_TIME]; default 24:00:00
  --partition NAME           partition [SHORTCUT_PARTITION]; default: the cluster's default
  --account NAME             account to charge [SHORTCUT_ACCOUNT]; default: yours
  --job-name NAME            job name [SHORTCUT_JOB_NAME]; default shortcut_jax
  --sbatch-arg ARG           extra '#SBATCH ARG' line, repeatable, e.g. --sbatch-arg=--exclusive
                             --sbatch-arg=--qos=high --sbatch-arg=--constraint=h100

Training:
  --config FILE              experiments file, relative to the repository root [SHORTCUT_CONFIG];
                             required; a variant suffix is allowed (experiments/x.py:small)
  --workdir /SHARED/PATH     checkpoints, metrics, samples and the job logs [SHORTCUT_WORKDIR];
                             required; an absolute path on a filesystem every node mounts
                             (NFS, Lustre, GPFS, ...); /tmp or /dev/shm only with --nodes 1
  --repo-dir DIR             checkout the nodes run from [SHORTCUT_REPO_DIR];
                             default: this checkout ($(cd "$LAUNCH_DIR/.." && pwd))
  --python PATH              interpreter on the nodes [SHORTCUT_PYTHON]; default python
  --setup COMMAND            shell code run before training on the batch node, e.g.
                             'module load cuda/12.4; source ~/venvs/shortcut/bin/activate'
                             [SHORTCUT_SETUP]
  --output-script PATH       where the rendered sbatch script is saved
                             [SHORTCUT_OUTPUT_SCRIPT]; default WORKDIR/slurm/JOB_NAME-UTCTIME.sbatch
  -- MAIN_ARGS...            everything after -- is passed to shortcut_jax.main, e.g.
                             -- --config.total_steps=400000 --config.data.data_dir=/shared/tfds

  --dry-run                  print the sbatch command and the rendered script; submit nothing
  -h, --help                 show this help

Optional GPU settings are read from your environment at submission (sbatch exports it), e.g.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9, XLA_PYTHON_CLIENT_PREALLOCATE=false, XLA_FLAGS=...,
NCCL_DEBUG=WARN, JAX_COORDINATOR_PORT=PORT. Prepared TFDS datasets: pass
-- --config.data.data_dir=/shared/tensorflow_datasets.
EOF
}

# Prints an error (first argument) with indented detail lines (the others) and exits with 2.
die() {
  echo "$PROG: error: $1" >&2
  shift
  local line
  for line in "$@"; do
    echo "  $line" >&2
  done
  echo "Run '$PROG --help' for the options." >&2
  exit 2
}

# ------------------------------------------------------------------ options
NODES=${SHORTCUT_NODES:-1}
GPUS_PER_NODE=${SHORTCUT_GPUS_PER_NODE:-8}
CPUS_PER_TASK=${SHORTCUT_CPUS_PER_TASK:-16}
TIME_LIMIT=${SHORTCUT_TIME:-24:00:00}
PARTITION=${SHORTCUT_PARTITION:-}
ACCOUNT=${SHORTCUT_ACCOUNT:-}
JOB_NAME=${SHORTCUT_JOB_NAME:-shortcut_jax}
CONFIG=${SHORTCUT_CONFIG:-}
WORKDIR=${SHORTCUT_WORKDIR:-}
REPO_DIR=${SHORTCUT_REPO_DIR:-$(cd "$LAUNCH_DIR/.." && pwd)}
PYTHON=${SHORTCUT_PYTHON:-python}
SETUP=${SHORTCUT_SETUP:-}
OUTPUT_SCRIPT=${SHORTCUT_OUTPUT_SCRIPT:-}
SBATCH_ARGS=()
MAIN_ARGS=()
DRY_RUN=0

while (($#)); do
  arg=$1
  case $arg in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 && shift ;;
    --)
      shift
      MAIN_ARGS=("$@")
      break
      ;;
    --nodes | --nodes=* | --gpus-per-node | --gpus-per-node=* | --cpus-per-task | \
      --cpus-per-task=* | --time | --time=* | --partition | --partition=* | --account | \
      --account=* | --job-name | --job-name=* | --sbatch-arg | --sbatch-arg=* | --config | \
      --config=* | --workdir | --workdir=* | --repo-dir | --repo-dir=* | --python | --python=* | \
      --setup | --setup=* | --output-script | --output-script=*)
      flag=${arg%%=*}
      if [[ $arg == *=* ]]; then
        value=${arg#*=}
        shift
      else
        (($# >= 2)) || die "$flag needs a value"
        value=$2
        shift 2
      fi
      case $flag in
        --nodes) NODES=$value ;;
        --gpus-per-node) GPUS_PER_NODE=$value ;;
        --cpus-per-task) CPUS_PER_TASK=$value ;;
        --time) TIME_LIMIT=$value ;;
        --partition) PARTITION=$value ;;
        --account) ACCOUNT=$value ;;
        --job-name) JOB_NAME=$value ;;
        --sbatch-arg) SBATCH_ARGS+=("$value") ;;
        --config) CONFIG=$value ;;
        --workdir) WORKDIR=$value ;;
        --repo-dir) REPO_DIR=$value ;;
        --python) PYTHON=$value ;;
        --setup) SETUP=$value ;;
        --output-script) OUTPUT_SCRIPT=$value ;;
      esac
      ;;
    *) die "unknown option '$arg' (arguments for shortcut_jax.main go after --)" ;;
  esac
done

# ------------------------------------------------------------------ validation
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ $GPUS_PER_NODE =~ ^([A-Za-z0-9_.-]+:)?[1-9][0-9]*$ ]] ||
  die "--gpus-per-node must be a positive integer (or TYPE:COUNT), got '$GPUS_PER_NODE'"
[[ $CPUS_PER_TASK =~ ^[1-9][0-9]*$ ]] ||
  die "--cpus-per-task must be a positive integer, got '$CPUS_PER_TASK'"
[[ -n $TIME_LIMIT ]] || die "--time must not be empty, e.g. --time 24:00:00"
[[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] ||
  die "--job-name '$JOB_NAME' may only hold letters, digits, '_', '.' and '-'"
[[ -n $CONFIG ]] ||
  die "--config is required, e.g. --config experiments/imagenet256.py (or set SHORTCUT_CONFIG)"
[[ -n $WORKDIR ]] ||
  die "--workdir is required: a directory on a filesystem every node shares" \
    "e.g. --workdir /shared/runs/NAME (or set SHORTCUT_WORKDIR)"
case $WORKDIR in
  /tmp | /tmp/* | /var/tmp | /var/tmp/* | /dev/shm | /dev/shm/*)
    if ((NODES > 1)); then
      die "--workdir '$WORKDIR' is node-local storage, but the job has $NODES nodes" \
        "Every node writes its checkpoint shards to the workdir, so it must be on a filesystem" \
        "that all nodes share (NFS, Lustre, GPFS, ...). Only a --nodes 1 job may use it."
    fi
    ;;
  /*) ;;
  *)
    die "--workdir '$WORKDIR' must be an absolute path on a filesystem every node shares" \
      "e.g. --workdir $PWD/${WORKDIR#./}"
    ;;
esac
[[ -d $REPO_DIR ]] || die "--repo-dir '$REPO_DIR' is not a directory"
REPO_DIR=$(cd "$REPO_DIR" && pwd)
config_file=${CONFIG%%:*}
if [[ $config_file == /* ]]; then
  [[ -f $config_file ]] || die "--config '$CONFIG': no such file"
else
  [[ -f $REPO_DIR/$config_file ]] ||
    die "--config '$CONFIG': no file $REPO_DIR/$config_file" \
      "the path is relative to the repository root (--repo-dir)"
fi
output_flag=--output-script
if [[ -z $OUTPUT_SCRIPT ]]; then
  output_flag=--workdir
  OUTPUT_SCRIPT=$WORKDIR/slurm/$JOB_NAME-$(date -u +%Y%m%dT%H%M%SZ).sbatch
fi
LOG_DIR=$(dirname "$OUTPUT_SCRIPT")

# Values written into '#SBATCH' lines are not quoted there: a newline would start a line of
# script and the other characters are read by sbatch's own option parser or by the shell.
check_header_value() {
  local flag=$1 value=$2
  if [[ $value == *$'\n'* || $value == *$'\r'* || $value =~ [\;\&\|\`\$\<\>\'\"\\] ]]; then
    die "$flag $(printf '%q' "$value") is written into an #SBATCH line and may not hold a newline or any of" \
      "; & | \` \$ < > ' \" \\ (give plain values, e.g. --partition gpu --sbatch-arg=--qos=high;" \
      "sbatch's input variables pass anything else, e.g. SBATCH_CONSTRAINT='a100&ib' $PROG ...)"
  fi
}
check_header_value --time "$TIME_LIMIT"
check_header_value --partition "$PARTITION"
check_header_value --account "$ACCOUNT"
check_header_value "$output_flag" "$LOG_DIR"
for extra in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
  check_header_value --sbatch-arg "$extra"
done

# ------------------------------------------------------------------ rendering
# Quotes one word for bash, leaving plain words (flags, paths) readable.
quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    local squote="'" escaped="'\\''"
    printf "'%s'" "${word//$squote/$escaped}"
  fi
}

render_header() {
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  echo "#SBATCH --time=$TIME_LIMIT"
  # SIGTERM 180 s before the time limit: training saves and exits 0 before KillWait ends it.
  echo "#SBATCH --signal=TERM@180"
  echo "#SBATCH --output=$LOG_DIR/%x-%j.out"
  if [[ -n $PARTITION ]]; then
    echo "#SBATCH --partition=$PARTITION"
  fi
  if [[ -n $ACCOUNT ]]; then
    echo "#SBATCH --account=$ACCOUNT"
  fi
  local extra
  for extra in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
    echo "#SBATCH $extra"
  done
}

render_settings() {
  echo "CONFIG=$(quote "$CONFIG")"
  echo "WORKDIR=$(quote "$WORKDIR")"
  echo "REPO_DIR=$(quote "$REPO_DIR")"
  echo "PYTHON=$(quote "$PYTHON")"
  echo "SETUP=$(quote "$SETUP")"
  local words="" word
  for word in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
    words+="${words:+ }$(quote "$word")"
  done
  echo "EXTRA_ARGS=($words)"
}

# The template with its marked header and settings blocks replaced.
render() {
  local line block=""
  while IFS= read -r line || [[ -n $line ]]; do
    case $line in
      "# >>> sbatch header"*)
        block=header
        echo "$line"
        render_header
        ;;
      "# >>> settings"*)
        block=settings
        echo "$line"
        render_settings
        ;;
      "# <<< "*)
        block=""
        echo "$line"
        ;;
      *) [[ -n $block ]] || echo "$line" ;;
    esac
  done <"$TEMPLATE"
}

[[ -f $TEMPLATE ]] || die "template $TEMPLATE is missing"
script=$(render)
grep -q '^#SBATCH --nodes=' <<<"$script" ||
  die "could not render $TEMPLATE: its '# >>> sbatch header' markers are missing"

if ((DRY_RUN)); then
  echo "# dry run: nothing below is executed"
  echo "+ mkdir -p $(quote "$LOG_DIR")"
  echo "+ sbatch $(quote "$OUTPUT_SCRIPT")"
  echo "# ----- $OUTPUT_SCRIPT -----"
  echo "$script"
  echo "# ----- end of $OUTPUT_SCRIPT -----"
  exit 0
fi

command -v sbatch >/dev/null ||
  die "sbatch is not on PATH: run this on a SLURM login node (or use --dry-run)"
mkdir -p "$LOG_DIR"
echo "$script" >"$OUTPUT_SCRIPT"
echo "$PROG: wrote $OUTPUT_SCRIPT; job logs go to $LOG_DIR/$JOB_NAME-JOBID.out" >&2
echo "+ sbatch $(quote "$OUTPUT_SCRIPT")" >&2
sbatch "$OUTPUT_SCRIPT"
