#!/usr/bin/env bash
# Train on a multi-host Cloud TPU slice with `gcloud compute tpus tpu-vm`: every command runs
# on all workers at once (--worker=all), one JAX process per host. See README.md here.
#
#   BUCKET=gs://my-bucket ACCELERATOR_TYPE=v5p-64 experiments/launch/tpu_pod.sh create
#   experiments/launch/tpu_pod.sh copy       # this checkout -> ~/deepseek-jax on every worker
#   experiments/launch/tpu_pod.sh install    # pip install -e .[tpu] + GCS clients, every worker
#   experiments/launch/tpu_pod.sh train      # experiments/train.py on every worker, background
#   experiments/launch/tpu_pod.sh logs       # follow worker 0's log (WORKER=3 for another)
#   experiments/launch/tpu_pod.sh stop       # SIGTERM: the trainer saves its step, exits 75
#   experiments/launch/tpu_pod.sh resume     # after preemption: recreate if needed, train again
#   experiments/launch/tpu_pod.sh delete
#
# Settings are environment variables, or flags before the subcommand (--zone=us-east5-a is
# ZONE=us-east5-a); DRY_RUN=1 / --dry_run prints the commands instead of running them.
set -euo pipefail

TPU_NAME=${TPU_NAME:-deepseek-jax}
ZONE=${ZONE:-us-east5-a}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
BUCKET=${BUCKET:-}
RUN_NAME=${RUN_NAME:-$TPU_NAME}
CONFIG=${CONFIG:-experiments/configs/small.py}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
# gs: --workdir=gs://<bucket>/<run> (orbax, etils.epath and tensorboardX write to the bucket);
# gcsfuse: mount the bucket at /gcs/<bucket> on every worker and train in that folder.
WORKDIR_MODE=${WORKDIR_MODE:-gs}
REMOTE_DIR=${REMOTE_DIR:-deepseek-jax}  # under each worker's home
WORKER=${WORKER:-0}
DRY_RUN=${DRY_RUN:-0}
DRY_RUN_STATE=${DRY_RUN_STATE:-READY}  # the TPU state a dry run of `resume` assumes

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry_run) DRY_RUN=1 ;;
    --help|-h) usage 0 ;;
    --*=*) key=${1%%=*}; key=${key#--}; key=${key^^}
           if [[ ! $key =~ ^(TPU_NAME|ZONE|PROJECT|ACCELERATOR_TYPE|RUNTIME_VERSION|SPOT|BUCKET\
|RUN_NAME|CONFIG|TRAIN_FLAGS|WORKDIR_MODE|REMOTE_DIR|WORKER)$ ]]; then
             echo "unknown flag $1" >&2; exit 2
           fi
           printf -v "$key" '%s' "${1#*=}" ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
  shift
done
[[ $# -ge 1 ]] || usage 2
CMD=$1

if [[ -z $RUNTIME_VERSION ]]; then  # the TPU VM image for the generation
  case $ACCELERATOR_TYPE in
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
if [[ -n $BUCKET && $BUCKET != gs://?* ]]; then
  echo "BUCKET must be gs://<bucket>[/<folder>], got $BUCKET" >&2; exit 2
fi
BUCKET_PATH=${BUCKET#gs://}
BUCKET_PATH=${BUCKET_PATH%/}  # <bucket>[/<folder>]: runs go in <folder>/<RUN_NAME>
BUCKET_NAME=${BUCKET_PATH%%/*}
MOUNT=/gcs/$BUCKET_NAME
case $WORKDIR_MODE in
  gcsfuse) WORKDIR=/gcs/$BUCKET_PATH/$RUN_NAME ;;
  gs) WORKDIR=gs://$BUCKET_PATH/$RUN_NAME ;;
  *) echo "WORKDIR_MODE must be gcsfuse or gs, got $WORKDIR_MODE" >&2; exit 2 ;;
esac
LOG=\~/$REMOTE_DIR-train.log  # on each worker
PIDFILE=\~/$REMOTE_DIR-train.pid
VENV=\~/$REMOTE_DIR-venv

run() {  # the command, or (dry run) its words shell-quoted on one line
  if [[ $DRY_RUN == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project="$PROJECT")

on_workers() {  # a shell command on every worker at once
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}

need_bucket() {
  [[ -n $BUCKET_NAME ]] || { echo "set BUCKET=gs://<bucket> (checkpoints and logs)" >&2; exit 2; }
}

mount_cmd() {  # idempotent: mount the bucket where the workdir is, if gcsfuse mode
  [[ $WORKDIR_MODE == gcsfuse ]] || { echo true; return; }
  echo "mountpoint -q $MOUNT || { sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT &&" \
       "gcsfuse --implicit-dirs --rename-dir-limit=1000000 $BUCKET_NAME $MOUNT; }"
}

create() {
  local spot=()
  [[ $SPOT == 1 ]] && spot=(--spot)
  run "${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot[@]}"
}

copy() {  # tracked and untracked-but-not-ignored files of this checkout
  local root tarball=/tmp/$REMOTE_DIR-src.tar.gz
  root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ (cd $root && git ls-files -co --exclude-standard | tar czf $tarball -T -)"
  else
    (cd "$root" && git ls-files -co --exclude-standard | tar czf "$tarball" -T -)
  fi
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:~/" "${WHERE[@]}" --worker=all
  on_workers "mkdir -p ~/$REMOTE_DIR && tar xzf ~/$(basename "$tarball") -C ~/$REMOTE_DIR"
}

install() {  # Python >= 3.11 in a venv (uv fetches it; TPU VM images ship 3.10), GCS access
  local cmd="export PATH=\$HOME/.local/bin:\$PATH && { command -v uv >/dev/null"
  cmd+=" || curl -LsSf https://astral.sh/uv/install.sh | sh; } && cd ~/$REMOTE_DIR"
  cmd+=" && uv venv --allow-existing --python 3.11 $VENV"
  cmd+=" && uv pip install --python $VENV/bin/python -e '.[tpu]'"
  if [[ $WORKDIR_MODE == gs ]]; then  # epath's gs:// (gcsfs); orbax and tensorboardX's GCS
    cmd+=" && uv pip install --python $VENV/bin/python gcsfs google-cloud-storage"
  else
    cmd+=" && { command -v gcsfuse >/dev/null || { echo \"deb https://packages.cloud.google.com/apt"
    cmd+=" gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
    cmd+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
    cmd+=" | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc"
    cmd+=" && sudo apt-get update -q && sudo apt-get install -yq gcsfuse; }; }"
  fi
  on_workers "$cmd"
}

train() {
  need_bucket
  # initialize=always: jax.distributed.initialize() on every host (it finds the other workers
  # from the TPU VM metadata); the trainer's "auto" looks only at environment variables.
  local train="$VENV/bin/python experiments/train.py --config=$CONFIG --workdir=$WORKDIR"
  train+=" --config.distributed.initialize=always${TRAIN_FLAGS:+ $TRAIN_FLAGS}"
  # One trainer per worker: a gs:// workdir has no lock (no atomic create on object stores).
  local running="test -f $PIDFILE && kill -0 \$(cat $PIDFILE) 2>/dev/null && { echo"
  running+=" \"a trainer is running (pid \$(cat $PIDFILE)); tpu_pod.sh stop first\" >&2; exit 1; }"
  on_workers "! { $running; } && cd ~/$REMOTE_DIR && $(mount_cmd) && { nohup $train > $LOG 2>&1"\
" < /dev/null & echo \$! > $PIDFILE; }"
}

stop() {  # SIGTERM: the trainer saves the step it reached and exits (code 75); wait for it
  on_workers "if test -f $PIDFILE; then pid=\$(cat $PIDFILE); kill -TERM \$pid 2>/dev/null;"\
" for i in \$(seq 900); do kill -0 \$pid 2>/dev/null || break; sleep 1; done;"\
" rm -f $PIDFILE; fi; true"
}

resume() {  # the same train command: the trainer resumes from the workdir's newest checkpoint
  local now describe=("${TPU[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)')
  if [[ $DRY_RUN == 1 ]]; then
    run "${describe[@]}"
    now=$DRY_RUN_STATE
  else
    now=$("${describe[@]}" 2>/dev/null || echo MISSING)
  fi
  if [[ $now != READY ]]; then  # preempted (spot) or gone: a new slice, then the same run
    echo "# $TPU_NAME is ${now:-MISSING}: recreating it"
    [[ $now != MISSING ]] && delete
    create; copy; install
  else
    stop
  fi
  train
}

delete() { run "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet; }

logs() {
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$WORKER" --command="tail -n 200 -F $LOG"
}

case $CMD in
  train|resume) need_bucket; "$CMD" ;;  # before anything is deleted or created
  create|copy|install|stop|delete|logs) "$CMD" ;;
  *) echo "unknown subcommand $CMD" >&2; usage 2 ;;
esac
