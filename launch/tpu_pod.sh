#!/usr/bin/env bash
# Train shortcut_jax on a Cloud TPU VM or a multi-host TPU pod slice.
#
#   launch/tpu_pod.sh --name my-v4 --zone us-central2-b --accelerator-type v4-32 \
#       --repo https://github.com/ORG/shortcut_jax.git --config experiments/imagenet256.py \
#       --workdir gs://MY_BUCKET/runs/imagenet256 --tail -- --config.total_steps=400000
#
# Steps: create (or --reuse) the TPU; put the code on every worker (git clone/pull of --repo, or
# --copy of this checkout) and pip install it with its tpu extra (jax[tpu]) into a venv; check on
# worker 0 that the run's programs compile and fit the chips' memory (`python -m
# shortcut_jax.compile`, compile-only, on the CPU); start `python -m shortcut_jax.main
# --distributed` on all workers at once under nohup; optionally
# follow worker 0's log (--tail) and delete the TPU when training ends (--delete-after).
# --dry-run prints every command (one per line, prefixed with "+ ") and runs none.
# Rerunning the same command with --reuse resumes from the newest checkpoint in --workdir.
# See launch/README.md and --help.
set -euo pipefail

PROG=$(basename "$0")
ROOT_DIR=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE (--repo URL | --copy)
           --config FILE --workdir gs://BUCKET/PATH [options] [-- MAIN_ARGS...]

Create (or reuse) a Cloud TPU VM / pod slice, install shortcut_jax on every worker, check on
worker 0 that the run fits the slice
  JAX_PLATFORMS=cpu python -m shortcut_jax.compile --config FILE --topology TYPE --config.*...
and run
  python -m shortcut_jax.main --config FILE --workdir gs://... --distributed MAIN_ARGS...
on all workers at once (jax.distributed.initialize() finds the other workers by itself).

TPU (every flag falls back to the environment variable in brackets):
  --name NAME                TPU node name [TPU_NAME]; required
  --zone ZONE                zone, e.g. us-central2-b; required
                             [TPU_ZONE, then CLOUDSDK_COMPUTE_ZONE]
  --project PROJECT          GCP project [TPU_PROJECT, then CLOUDSDK_CORE_PROJECT];
                             default: gcloud's configured project
  --accelerator-type TYPE    e.g. v4-32, v5p-64, v5litepod-16, v6e-16 [TPU_ACCELERATOR_TYPE];
                             required unless --reuse finds the TPU
  --runtime-version VERSION  TPU software version [TPU_RUNTIME_VERSION]; default by generation:
                             v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                             v5e/v5litepod v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base
  --queued                   create through 'gcloud compute tpus queued-resources create
                             --node-id NAME' and wait until it is ACTIVE [TPU_QUEUED=1]
  --spot                     Spot capacity (cheaper, can be preempted) [TPU_SPOT=1]
  --reuse                    skip creation if 'gcloud compute tpus tpu-vm describe NAME'
                             finds it; a PREEMPTED one is deleted and created again
                             (use this to resume or relaunch) [TPU_REUSE=1]
  --delete-after             delete the TPU (or its queued resource) when training ends,
                             whether it succeeded or failed [TPU_DELETE_AFTER=1]; if a step
                             before training fails, the TPU is kept and the delete command shown

Code (one of --repo / --copy, unless --skip-install):
  --repo URL                 git URL cloned (or pulled) on every worker [SHORTCUT_REPO]
  --branch BRANCH            branch or tag of --repo [SHORTCUT_BRANCH]; default: the default branch
  --copy                     copy this checkout ($ROOT_DIR, without runs/, .git, caches)
                             to every worker with 'gcloud compute tpus tpu-vm scp --worker=all'
  --skip-install             keep the code and venv already on the workers (a quick relaunch
                             on a TPU set up by an earlier run; an error if it had to be created)

Training:
  --config FILE              experiments file, relative to the repository root [SHORTCUT_CONFIG];
                             required; a variant suffix is allowed (experiments/x.py:small)
  --workdir gs://BUCKET/PATH checkpoints, metrics and samples [SHORTCUT_WORKDIR]; required.
                             Every worker writes its checkpoint shards there, so it must be a
                             GCS bucket path that all workers share
  --allow-local-workdir      accept a local path anyway (only sound on a single-host TPU VM)
  --env NAME=VALUE           export NAME=VALUE for training and the compile check (repeatable),
                             e.g. --env JAX_COMPILATION_CACHE_DIR=gs://MY_BUCKET/jax_cache
  --skip-compile-check       do not run the compile check [TPU_SKIP_COMPILE_CHECK=1]. By default,
                             after the install and before training, worker 0 compiles the run's
                             programs for the slice (python -m shortcut_jax.compile --topology
                             TYPE with the --config.* arguments of MAIN_ARGS and the --env
                             variables; JAX_PLATFORMS=cpu, so libtpu compiles without taking the
                             TPU chips). If a program does not fit the chips' memory (exit 1) or
                             the check rejects its input (exit 2), training is not started, the
                             TPU is kept, and the script exits with that status. With --reuse and
                             no --accelerator-type, TYPE comes from 'tpu-vm describe'
  -- MAIN_ARGS...            everything after -- is passed to shortcut_jax.main, e.g.
                             -- --config.total_steps=400000 --config.data.data_dir=gs://B/tfds

Monitoring:
  --tail                     stream worker 0's log until training ends [TPU_TAIL=1]
  --dry-run                  print every command (prefixed with '+ ') and run none
  -h, --help                 show this help

Environment only:
  LIBTPU_FIND_LINKS          pip --find-links URL for libtpu; default empty (jax[tpu] pulls
                             libtpu from PyPI); set it only for a libtpu that is not on PyPI
  TPU_PYTHON                 interpreter the worker venv is built from; default python3.11
                             (installed with apt if missing: the TPU images ship Python 3.10)
  REMOTE_DIR, REMOTE_VENV, REMOTE_LOG_DIR
                             paths on the workers, relative to the home directory (or
                             absolute); defaults shortcut_jax, shortcut_jax_venv,
                             shortcut_jax_logs. REMOTE_DIR is replaced (rm -rf) on every
                             install, so each may only hold letters, digits, '_', '.', '-'
                             and '/', and may not be the home directory or / itself

On the workers the log is ~/shortcut_jax_logs/train.log (appended to across relaunches), the
process id ~/shortcut_jax_logs/train.pid and the exit status ~/shortcut_jax_logs/exit_code.
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

note() { echo "$PROG: $*" >&2; }

# Quotes one word for a POSIX shell, leaving plain words (flags, paths, URLs) readable.
shell_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    local squote="'" escaped="'\\''"
    printf "'%s'" "${word//$squote/$escaped}"
  fi
}

# Quotes every argument and joins them with spaces.
shell_join() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or only prints it under --dry-run. Commands are echoed with a "+ " prefix.
run() {
  if ((DRY_RUN)); then
    echo "+ $(shell_join "$@")"
  else
    echo "+ $(shell_join "$@")" >&2
    "$@"
  fi
}

# ------------------------------------------------------------------ options
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
PROJECT=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
# 1 for 1/true/yes (any case), else 0: the environment fallbacks of the switches.
as_bool() {
  case $1 in
    1 | [Tt][Rr][Uu][Ee] | [Yy][Ee][Ss]) echo 1 ;;
    *) echo 0 ;;
  esac
}
QUEUED=$(as_bool "${TPU_QUEUED:-0}")
SPOT=$(as_bool "${TPU_SPOT:-0}")
REUSE=$(as_bool "${TPU_REUSE:-0}")
DELETE_AFTER=$(as_bool "${TPU_DELETE_AFTER:-0}")
TAIL=$(as_bool "${TPU_TAIL:-0}")
SKIP_COMPILE_CHECK=$(as_bool "${TPU_SKIP_COMPILE_CHECK:-0}")
REPO=${SHORTCUT_REPO:-}
BRANCH=${SHORTCUT_BRANCH:-}
COPY=0
SKIP_INSTALL=0
CONFIG=${SHORTCUT_CONFIG:-}
WORKDIR=${SHORTCUT_WORKDIR:-}
ALLOW_LOCAL_WORKDIR=0
DRY_RUN=0
ENV_VARS=()
MAIN_ARGS=()

LIBTPU_FIND_LINKS=${LIBTPU_FIND_LINKS:-}
TPU_PYTHON=${TPU_PYTHON:-python3.11}
REMOTE_DIR=${REMOTE_DIR:-shortcut_jax}
REMOTE_VENV=${REMOTE_VENV:-shortcut_jax_venv}
REMOTE_LOG_DIR=${REMOTE_LOG_DIR:-shortcut_jax_logs}

# Value of an option given as "--flag VALUE" or "--flag=VALUE"; sets SHIFT to 1 or 2.
option_value() {
  local flag=$1 arg=$2
  if [[ $arg == *=* ]]; then
    VALUE=${arg#*=}
    SHIFT=1
  else
    (($# >= 3)) || die "$flag needs a value"
    VALUE=$3
    SHIFT=2
  fi
}

while (($#)); do
  arg=$1
  case $arg in
    -h | --help)
      usage
      exit 0
      ;;
    --name | --name=* | --zone | --zone=* | --project | --project=* | --accelerator-type | \
      --accelerator-type=* | --runtime-version | --runtime-version=* | --repo | --repo=* | \
      --branch | --branch=* | --config | --config=* | --workdir | --workdir=* | --env | --env=*)
      flag=${arg%%=*}
      option_value "$flag" "$@"
      case $flag in
        --name) NAME=$VALUE ;;
        --zone) ZONE=$VALUE ;;
        --project) PROJECT=$VALUE ;;
        --accelerator-type) ACCELERATOR_TYPE=$VALUE ;;
        --runtime-version) RUNTIME_VERSION=$VALUE ;;
        --repo) REPO=$VALUE ;;
        --branch) BRANCH=$VALUE ;;
        --config) CONFIG=$VALUE ;;
        --workdir) WORKDIR=$VALUE ;;
        --env)
          [[ $VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs NAME=VALUE, got '$VALUE'"
          ENV_VARS+=("$VALUE")
          ;;
      esac
      shift "$SHIFT"
      ;;
    --queued) QUEUED=1 && shift ;;
    --spot) SPOT=1 && shift ;;
    --reuse) REUSE=1 && shift ;;
    --delete-after) DELETE_AFTER=1 && shift ;;
    --tail) TAIL=1 && shift ;;
    --copy) COPY=1 && shift ;;
    --skip-install) SKIP_INSTALL=1 && shift ;;
    --allow-local-workdir) ALLOW_LOCAL_WORKDIR=1 && shift ;;
    --skip-compile-check) SKIP_COMPILE_CHECK=1 && shift ;;
    --dry-run) DRY_RUN=1 && shift ;;
    --)
      shift
      MAIN_ARGS=("$@")
      break
      ;;
    *) die "unknown option '$arg' (arguments for shortcut_jax.main go after --)" ;;
  esac
done

# ------------------------------------------------------------------ validation
[[ -n $NAME ]] || die "--name is required: the TPU node name (or set TPU_NAME)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' is not a valid TPU name" \
    "use lowercase letters, digits and '-', starting with a letter"
[[ -n $ZONE ]] || die "--zone is required, e.g. --zone us-central2-b (or set TPU_ZONE)"
if [[ -z $ACCELERATOR_TYPE ]] && ((!REUSE)); then
  die "--accelerator-type is required to create the TPU, e.g. --accelerator-type v4-32" \
    "(or pass --reuse to use an existing TPU)"
fi
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5e-* | v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
if ((!SKIP_INSTALL)); then
  if [[ -n $REPO ]] && ((COPY)); then
    die "give either --repo URL or --copy, not both"
  fi
  if [[ -z $REPO ]] && ((!COPY)); then
    die "say where the code comes from:" \
      "--repo GIT_URL (cloned on every worker) or --copy (this checkout)"
  fi
fi
if [[ -n $BRANCH && -z $REPO ]]; then
  die "--branch needs --repo"
fi
[[ -n $CONFIG ]] ||
  die "--config is required, e.g. --config experiments/imagenet256.py (or set SHORTCUT_CONFIG)"
if ((COPY)) && [[ ! -f $ROOT_DIR/${CONFIG%%:*} ]]; then
  die "--config '$CONFIG': no file $ROOT_DIR/${CONFIG%%:*}" \
    "the path is relative to the repository root"
fi
[[ -n $WORKDIR ]] ||
  die "--workdir is required, e.g. --workdir gs://MY_BUCKET/runs/NAME (or set SHORTCUT_WORKDIR)"
if [[ $WORKDIR != gs://?* ]] && ((!ALLOW_LOCAL_WORKDIR)); then
  die "--workdir '$WORKDIR' is a local path; on a TPU it must be a gs:// bucket path" \
    "Every worker of a pod writes its checkpoint shards to the workdir, so it must be storage" \
    "that all workers share: use --workdir gs://BUCKET/PATH (a bucket in the TPU's region)." \
    "On a single-host TPU VM you may pass --allow-local-workdir to keep a local path."
fi
if ((DELETE_AFTER)) && ((!TAIL)); then
  note "--delete-after: this script stays attached until training ends, then deletes $NAME"
fi

# Checks a worker path given in the environment: REMOTE_DIR is deleted with rm -rf before every
# install, so it must name a plain directory of its own (never /, ~, $HOME or a parent of it).
check_remote_path() {
  local variable=$1 path=$2
  [[ -n $path ]] || die "$variable is empty" \
    "give a directory relative to the home directory of the workers, e.g. $variable=shortcut_jax"
  [[ $path =~ ^[A-Za-z0-9_./-]+$ ]] ||
    die "$variable='$path' may only hold letters, digits, '_', '.', '-' and '/'" \
      "no spaces, quotes, '~', '\$' or other shell characters: it is removed with rm -rf"
  local component
  local -a components
  IFS=/ read -r -a components <<<"$path"
  local kept=0
  for component in "${components[@]}"; do
    [[ $component != ".." ]] ||
      die "$variable='$path' has a '..' component; name a directory below the home directory"
    if [[ -n $component && $component != "." ]]; then
      kept=$((kept + 1))
    fi
  done
  ((kept > 0)) ||
    die "$variable='$path' is the home directory or / itself, which rm -rf would wipe" \
      "name a directory of its own, e.g. $variable=shortcut_jax"
  if [[ $path == /* ]]; then
    local -a parts=()
    for component in "${components[@]}"; do
      [[ -z $component || $component == "." ]] || parts+=("$component")
    done
    # A top-level directory (/home, /data), a system directory (/usr/local) or a home root
    # (/home/me, /root) holds more than this run's code.
    if ((${#parts[@]} == 1)) || { ((${#parts[@]} == 2)) &&
      [[ " bin boot dev etc home lib lib32 lib64 media mnt proc root run sbin snap srv sys usr var " == *" ${parts[0]} "* ]]; }; then
      die "$variable='$path' is a system directory or a home root, which rm -rf would wipe" \
        "name a directory of its own below it, e.g. $variable=/opt/shortcut_jax or a relative one"
    fi
  fi
}
check_remote_path REMOTE_DIR "$REMOTE_DIR"
check_remote_path REMOTE_VENV "$REMOTE_VENV"
check_remote_path REMOTE_LOG_DIR "$REMOTE_LOG_DIR"

# ------------------------------------------------------------------ commands
GCLOUD_LOCATION=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then
  GCLOUD_LOCATION+=(--project "$PROJECT")
fi
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOCATION[@]}")
# A worker path as one double-quoted word for the remote shell: $HOME expands, nothing splits.
remote_path() {
  local path=${1%/}
  if [[ $path == /* ]]; then
    printf '"%s"' "$path"
  else
    # shellcheck disable=SC2016 # $HOME is for the worker's shell to expand
    printf '"$HOME/%s"' "${path#./}"
  fi
}
VENV_DIR=$(remote_path "$REMOTE_VENV")
VENV_PYTHON=$(remote_path "$REMOTE_VENV/bin/python")
CODE_DIR=$(remote_path "$REMOTE_DIR")
LOG_DIR=$(remote_path "$REMOTE_LOG_DIR")
PID_FILE=$(remote_path "$REMOTE_LOG_DIR/train.pid")
LOG_FILE=$(remote_path "$REMOTE_LOG_DIR/train.log")
EXIT_FILE=$(remote_path "$REMOTE_LOG_DIR/exit_code")
TARBALL_NAME="$(basename "$REMOTE_DIR").tar.gz" # scp puts it in the home directory
TARBALL=$(remote_path "$TARBALL_NAME")

# The training command on each worker (the venv's interpreter, words quoted for its shell).
train_line=""
if ((${#ENV_VARS[@]})); then
  train_line="env $(shell_join "${ENV_VARS[@]}") "
fi
train_line+="$VENV_PYTHON -m shortcut_jax.main "
train_line+=$(shell_join --config "$CONFIG" --workdir "$WORKDIR" --distributed \
  ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})

# The compile check on worker 0: the run's programs compiled for the slice by libtpu's compile-only
# client, on the CPU (JAX_PLATFORMS=cpu keeps the TPU chips free for training). It gets the
# --env variables (XLA or libtpu flags change what fits), not the persistent compilation cache,
# and the --config.* overrides among MAIN_ARGS ("--config.x=v", or "--config.x v").
COMPILE_OVERRIDES=()
for ((index = 0; index < ${#MAIN_ARGS[@]}; index++)); do
  word=${MAIN_ARGS[index]}
  [[ $word == --config.?* ]] || continue
  COMPILE_OVERRIDES+=("$word")
  next=${MAIN_ARGS[index + 1]:-}
  if [[ $word != *=* && -n $next && $next != -* ]]; then
    COMPILE_OVERRIDES+=("$next")
    index=$((index + 1))
  fi
done
compile_command() {
  local topology=$1 line=""
  if ((${#ENV_VARS[@]})); then
    line="$(shell_join "${ENV_VARS[@]}") "
  fi
  line+="JAX_PLATFORMS=cpu JAX_ENABLE_COMPILATION_CACHE=false $VENV_PYTHON -m shortcut_jax.compile "
  line+=$(shell_join --config "$CONFIG" --topology "$topology" \
    ${COMPILE_OVERRIDES[@]+"${COMPILE_OVERRIDES[@]}"})
  # Status 3 when the code is missing or training is running: never taken for "does not fit".
  printf '%s' "cd $CODE_DIR || exit 3; ${RUNNING_CHECK/exit 1/exit 3}; env $line"
}

# With --reuse and no --accelerator-type: the TPU's type, from describe (the topology of the check).
find_accelerator_type() {
  local describe=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_LOCATION[@]}"
    --format 'value(acceleratorType)')
  if ((DRY_RUN)); then
    echo "# --accelerator-type not given: the compile check takes the TPU's type from describe"
    run "${describe[@]}"
    ACCELERATOR_TYPE=ACCELERATOR_TYPE_FROM_DESCRIBE
    return
  fi
  ACCELERATOR_TYPE=$(run "${describe[@]}") || ACCELERATOR_TYPE=""
  [[ -n $ACCELERATOR_TYPE ]] ||
    die "the compile check needs the TPU's accelerator type, and describe did not give it" \
      "pass --accelerator-type TYPE (e.g. v4-32), or --skip-compile-check"
  note "the compile check uses the TPU's accelerator type $ACCELERATOR_TYPE"
}

compile_check() {
  [[ -n $ACCELERATOR_TYPE ]] || find_accelerator_type
  local status=0
  run "${SSH[@]}" --worker=0 --command "$(compile_command "$ACCELERATOR_TYPE")" || status=$?
  ((DRY_RUN || status == 0)) && return
  case $status in
    1)
      echo "$PROG: error: the compile check on worker 0 exited 1: the run does not fit" \
        "$ACCELERATOR_TYPE (the lines above name each program over the chips' memory, by how" \
        "much, and what would help; a traceback there instead means the check itself failed)." \
        "Training was not started." >&2
      ;;
    2)
      echo "$PROG: error: the compile check on worker 0 rejected its input (exit 2; its message" \
        "above names the config, an override or the topology $ACCELERATOR_TYPE)." \
        "Training was not started." >&2
      ;;
    *)
      echo "$PROG: error: the compile check on worker 0 did not run or failed (status $status;" \
        "see above). Training was not started." >&2
      ;;
  esac
  note "fix the config or the slice and rerun with --reuse; --skip-compile-check trains unchecked"
  exit "$status"
}

create_tpu() {
  TPU_CREATED=1
  if ((QUEUED)); then
    local create=(gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME"
      "${GCLOUD_LOCATION[@]}" --accelerator-type "$ACCELERATOR_TYPE"
      --runtime-version "$RUNTIME_VERSION")
    ((SPOT)) && create+=(--spot)
    run "${create[@]}"
    wait_until_active
  else
    local create=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_LOCATION[@]}"
      --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
    ((SPOT)) && create+=(--spot)
    run "${create[@]}"
  fi
}

wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_LOCATION[@]}"
    --format 'value(state.state)')
  if ((DRY_RUN)); then
    echo "# poll every 60 s until the queued resource is ACTIVE:"
    run "${describe[@]}"
    return
  fi
  local state
  while true; do
    state=$("${describe[@]}" 2>/dev/null) || state="unknown (describe failed)"
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        echo "$PROG: error: queued resource $NAME is $state" >&2
        exit 1
        ;;
    esac
    note "queued resource $NAME is $state; checking again in 60 s"
    sleep 60
  done
}

# With --reuse: keep a usable TPU, replace a preempted/failed one, create a missing one.
create_or_reuse() {
  if ((!REUSE)); then
    create_tpu
    return
  fi
  local describe=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_LOCATION[@]}"
    --format 'value(state)')
  local dead_states="PREEMPTED TERMINATED"
  if ((QUEUED)); then
    describe=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_LOCATION[@]}"
      --format 'value(state.state)')
    dead_states="FAILED SUSPENDED"
  fi
  if ((DRY_RUN)); then
    run "${describe[@]}"
    echo "# if it is ${dead_states// / or }, delete it first:"
    run "${DELETE_CMD[@]}"
    echo "# if it does not exist (or was deleted above), create it:"
    if [[ -n $ACCELERATOR_TYPE ]]; then
      create_tpu
    else
      echo "# (error: --accelerator-type is needed to create it)"
    fi
    return
  fi
  local state
  if state=$(run "${describe[@]}" 2>/dev/null); then
    case " $dead_states " in
      *" $state "*)
        note "TPU $NAME is $state: deleting it to create it again"
        run "${DELETE_CMD[@]}"
        ;;
      *)
        note "reusing the existing TPU $NAME (state ${state:-unknown})"
        if ((QUEUED)); then
          wait_until_active
        fi
        return
        ;;
    esac
  fi
  [[ -n $ACCELERATOR_TYPE ]] ||
    die "TPU $NAME does not exist in $ZONE" \
      "and --accelerator-type is not given, so it cannot be created"
  create_tpu
}

copy_code() {
  local tarball="${TMPDIR:-/tmp}/$NAME-$$-$TARBALL_NAME"
  LOCAL_TARBALL=$tarball
  # Virtual environments (any directory holding a pyvenv.cfg, with GNU tar) stay behind.
  local venv_excludes=(--exclude ./.venv --exclude ./venv --exclude ./.ci-venv)
  if tar --version 2>/dev/null | grep -q GNU; then
    venv_excludes+=(--exclude-tag-all=pyvenv.cfg)
  fi
  run env COPYFILE_DISABLE=1 tar -czf "$tarball" --exclude ./runs --exclude ./.git \
    "${venv_excludes[@]}" --exclude __pycache__ --exclude '*.egg-info' \
    --exclude .pytest_cache --exclude .ruff_cache --exclude .ipynb_checkpoints -C "$ROOT_DIR" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$TARBALL_NAME" "${GCLOUD_LOCATION[@]}" \
    --worker=all
}

# Stops a worker command if a training process launched earlier is still alive there.
PID_OF_RUN="\$(cat $PID_FILE)"
RUNNING_CHECK="if [ -f $PID_FILE ] && kill -0 \"$PID_OF_RUN\" 2>/dev/null; then"
RUNNING_CHECK+=" echo \"error: training is still running on \$(hostname) (pid $PID_OF_RUN);"
RUNNING_CHECK+=" stop it first: kill $PID_OF_RUN\" >&2; exit 1; fi"

install_command() {
  local code_step
  if ((COPY)); then
    code_step="rm -rf $CODE_DIR && mkdir -p $CODE_DIR && tar -xzf $TARBALL -C $CODE_DIR"
    code_step+=" && rm -f $TARBALL"
  else
    local repo branch_flag="" update="git -C $CODE_DIR pull -q --ff-only"
    repo=$(shell_quote "$REPO")
    if [[ -n $BRANCH ]]; then
      local branch
      branch=$(shell_quote "$BRANCH")
      branch_flag=" --branch $branch"
      update="git -C $CODE_DIR fetch -q --tags origin && git -C $CODE_DIR checkout -q $branch"
      update+=" && if git -C $CODE_DIR rev-parse -q --verify origin/$branch >/dev/null;"
      update+=" then git -C $CODE_DIR merge -q --ff-only origin/$branch; fi"
    fi
    code_step="if [ -d $CODE_DIR/.git ]; then $update;"
    code_step+=" else rm -rf $CODE_DIR && git clone -q$branch_flag $repo $CODE_DIR; fi"
  fi
  local find_links=""
  if [[ -n $LIBTPU_FIND_LINKS ]]; then
    find_links=" --find-links $(shell_quote "$LIBTPU_FIND_LINKS")"
  fi
  local python
  python=$(shell_quote "$TPU_PYTHON")
  # Fresh TPU VMs run unattended-upgrades at boot: wait for the dpkg lock instead of failing.
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  printf '%s' "set -e; $RUNNING_CHECK; " \
    "if ! command -v $python >/dev/null; then $apt update -qq && $apt install -y -qq" \
    " $python $python-venv; fi; " \
    "[ -x $VENV_PYTHON ] || $python -m venv $VENV_DIR; " \
    "$code_step; " \
    "$VENV_PYTHON -m pip install -q -U pip; " \
    "$VENV_PYTHON -m pip install -q -e $CODE_DIR'[tpu]'$find_links"
}

launch_command() {
  # The wrapper whose pid is in train.pid forwards SIGTERM to Python and waits for it, so
  # `kill $(cat train.pid)` stops training the way a preemption does (save, exit 0), the exit
  # status is still recorded, and --delete-after waits for the save.
  local inner="trap 'kill -TERM \$child 2>/dev/null' TERM; $train_line & child=\$!; "
  inner+="wait \$child; status=\$?; while kill -0 \$child 2>/dev/null; do wait \$child; "
  inner+="status=\$?; done; echo \$status > $EXIT_FILE"
  printf '%s' "mkdir -p $LOG_DIR && cd $CODE_DIR && $RUNNING_CHECK; " \
    "rm -f $EXIT_FILE; " \
    "echo \"=== \$(date -u) launch on \$(hostname)\" >> $LOG_FILE; " \
    "nohup bash -c $(shell_quote "$inner") >> $LOG_FILE 2>&1 < /dev/null & " \
    "echo \$! > $PID_FILE"
}

# Blocks (remotely) until the training process on the worker has exited.
WAIT_CMD="while kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null; do sleep 60; done"

wait_for_all_workers() {
  if ((DRY_RUN)); then
    echo "# wait (reconnecting if ssh drops) until training has ended on every worker:"
    run "${SSH[@]}" --worker=all --command "$WAIT_CMD"
    return
  fi
  local attempt
  for attempt in $(seq 1 100); do
    if run "${SSH[@]}" --worker=all --command "$WAIT_CMD"; then
      return 0
    fi
    note "lost the connection while waiting (attempt $attempt); reconnecting in 60 s"
    sleep 60
  done
  return 1
}

if ((QUEUED)); then
  DELETE_CMD=(gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_LOCATION[@]}" --force
    --quiet)
else
  DELETE_CMD=(gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_LOCATION[@]}" --quiet)
fi

LOCAL_TARBALL=""
TPU_CREATED=0
TPU_TOUCHED=0
TPU_DELETED=0
# On exit: remove the local tarball; after a failure, say that the TPU is still there.
on_exit() {
  local status=$?
  if [[ -n $LOCAL_TARBALL ]] && ((!DRY_RUN)); then
    rm -f "$LOCAL_TARBALL"
  fi
  if ((status != 0 && TPU_TOUCHED && !TPU_DELETED && !DRY_RUN)); then
    note "stopped with an error; the TPU $NAME is kept. Delete it with:"
    note "  $(shell_join "${DELETE_CMD[@]}")"
  fi
}
trap on_exit EXIT

# ------------------------------------------------------------------ steps
((DRY_RUN)) && echo "# dry run: nothing below is executed"

echo "# 1. create or reuse the TPU $NAME"
TPU_TOUCHED=1
create_or_reuse

if ((SKIP_INSTALL)); then
  echo "# 2. --skip-install: keeping the code and venv already on the workers"
  if ((TPU_CREATED && !DRY_RUN)); then
    die "--skip-install, but $NAME was just created and holds no code yet" \
      "rerun without --skip-install, with --repo URL or --copy"
  fi
else
  echo "# 2. put the code on every worker and install it with its tpu extra (jax[tpu])"
  ((COPY)) && copy_code
  run "${SSH[@]}" --worker=all --command "$(install_command)"
fi

if ((SKIP_COMPILE_CHECK)); then
  echo "# 3. --skip-compile-check: not checking that the run fits the TPU"
else
  echo "# 3. check on worker 0 that the run's programs compile and fit the TPU (on its CPU)"
  compile_check
fi

echo "# 4. start training on all workers at once"
run "${SSH[@]}" --worker=all --command "$(launch_command)"

TAIL_CMD="tail --pid=\"\$(cat $PID_FILE)\" -n 200 -F $LOG_FILE"
if ((TAIL)); then
  echo "# 5. follow worker 0's log until training ends"
  run "${SSH[@]}" --worker=0 --command "$TAIL_CMD" || note "log stream ended: $?"
fi

if ((DELETE_AFTER)); then
  echo "# 6. wait for training to end, then delete the TPU"
  status=1
  if wait_for_all_workers; then
    if ((DRY_RUN)); then
      run "${SSH[@]}" --worker=0 --command "cat $EXIT_FILE"
      status=0
    else
      status=$(run "${SSH[@]}" --worker=0 --command "cat $EXIT_FILE" || echo 1)
      note "training exited with status $status on worker 0"
    fi
  fi
  run "${DELETE_CMD[@]}"
  TPU_DELETED=1
  exit "$status"
fi

if ((!DRY_RUN)); then
  note "training runs in the background on every worker of $NAME. Follow it with:"
  note "  $(shell_join "${SSH[@]}" --worker=0 --command "$TAIL_CMD")"
  note "delete the TPU when done: $(shell_join "${DELETE_CMD[@]}")"
fi
