#!/usr/bin/env bash
# Launch leffa_jax training on a Cloud TPU VM slice (single- or multi-host).
#
#   1. create the slice if it does not exist (or --reuse an existing one),
#   2. install the project on every worker (clone/update or copy the local tree, .venv, jax[tpu]),
#   3. start `python -m leffa_jax.train` on all hosts at once, in the background, logging to
#      ~/leffa_jax_repo/logs/train.log on each worker.
#
# --dry-run prints every command (prefixed with "+ ") instead of running it and never calls
# gcloud, so it works on machines without the Cloud SDK. See docs/tpu.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch_tpu.sh --name NAME [options] [-- TRAINER_FLAGS...]

Create (or reuse) a Cloud TPU VM slice, install leffa_jax on every worker, start training on all
hosts. Without an action flag it does all three steps.

Required:
  --name NAME               TPU VM name

Slice:
  --zone ZONE               e.g. us-east5-a (default: gcloud's configured zone)
  --project PROJECT         (default: gcloud's configured project)
  --accelerator-type TYPE   e.g. v5p-64, v4-32, v5litepod-16, v6e-16 (needed to create)
  --version VERSION         TPU runtime (default from the type: v5p -> v2-alpha-tpuv5,
                            v5e -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e,
                            v4 and older -> tpu-ubuntu2204-base)
  --spot | --preemptible    request Spot / preemptible capacity
  --reuse                   assume the slice exists; never describe/create it
                            (default: `describe`, and create only if it is missing)

Code:
  --local                   copy this working tree (git tracked + untracked, not ignored) to all
                            workers with `tpu-vm scp --worker=all` (default)
  --src DIR                 tree to copy with --local (default: this script's folder)
  --repo-url URL            instead, git clone/update URL on every worker
  --branch BRANCH           branch/tag/ref for --repo-url (default: the remote's HEAD)
  --python PY               interpreter for the workers' .venv (default: python3.11; installed
                            with apt if missing)
  --skip-install            do not copy/install; just (re)start training

Training:
  --config FILE             trainer config, e.g. leffa_jax/configs/tryon_512.py (required to train)
  --workdir DIR             checkpoints/logs: gs://bucket/run or a path on each worker (required)
  --extra "FLAGS"           passed through to the trainer, split on whitespace, e.g.
                            "--config.train.batch_size=512 --config.train.steps=100000"
  -- FLAGS...               trainer flags after `--` are passed word for word (use this for
                            values with spaces: -- --config.data.root='/data/viton hd')
  --env KEY=VALUE           extra environment for the trainer (repeatable)

Actions (instead of create/install/train):
  --stop                    stop training on all workers
  --logs                    follow the training log of worker 0
  --delete                  delete the slice

Other:
  --dry-run                 print the commands ("+ cmd", one per line), run nothing
  -h, --help                this help
EOF
}

die() {
  echo "launch_tpu.sh: $*" >&2
  echo "Try 'launch_tpu.sh --help'." >&2
  exit 2
}

# ---------------------------------------------------------------- arguments
NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" CAPACITY=""
REPO_URL="" BRANCH="" MODE="local" PYTHON="python3.11"
CONFIG="" WORKDIR="" EXTRA=""
DRY_RUN=0 REUSE=0 SKIP_INSTALL=0 ACTION="up"
SRC="${BASH_SOURCE[0]%/*}"
[[ "$SRC" == "${BASH_SOURCE[0]}" ]] && SRC="."
TRAIN_ENV=()
PASS_ARGS=()  # everything after `--`: trainer flags, passed as separate words

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  arg="$1"
  if [[ "$arg" == --*=* ]]; then  # --flag=value -> --flag value
    set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
    arg="$1"
  fi
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --spot) CAPACITY="--spot"; shift ;;
    --preemptible) CAPACITY="--preemptible"; shift ;;
    --reuse) REUSE=1; shift ;;
    --local) MODE="local"; shift ;;
    --src) need_value "$@"; SRC="$2"; MODE="local"; shift 2 ;;
    --repo-url) need_value "$@"; REPO_URL="$2"; MODE="git"; shift 2 ;;
    --branch) need_value "$@"; BRANCH="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --extra) [[ $# -ge 2 ]] || die "--extra needs a value"; EXTRA="$2"; shift 2 ;;
    --env)
      need_value "$@"
      [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"
      TRAIN_ENV+=("$2"); shift 2 ;;
    --stop) ACTION="stop"; shift ;;
    --logs) ACTION="logs"; shift ;;
    --delete) ACTION="delete"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; PASS_ARGS+=("$@"); break ;;
    *) usage >&2; die "unknown argument: $arg" ;;
  esac
done

if [[ -z "$NAME" ]]; then
  usage >&2
  die "--name is required"
fi
if [[ "$ACTION" == "up" ]]; then
  [[ -n "$CONFIG" ]] || { usage >&2; die "--config is required to train"; }
  [[ -n "$WORKDIR" ]] || { usage >&2; die "--workdir is required to train"; }
fi
if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;  # v4, v3, v2
  esac
fi

REMOTE_DIR="leffa_jax_repo"           # relative to the workers' home directory
REMOTE_TARBALL="leffa_jax_src.tgz"
JAX_TPU="jax[tpu]==0.10.2"
LIBTPU_INDEX="https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# ---------------------------------------------------------------- helpers
# Shell-quote one word: as is when it is plain, else in single quotes ('\'' for a quote).
# Same rule as Python's shlex.quote; unlike printf %q it never emits bash-only $'..' forms, so
# the remote login shell may be any POSIX sh, and dry-run lines stay readable.
q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    local sq="'" esc="'\\''"
    printf "'%s'" "${1//$sq/$esc}"
  fi
}

# Quote all arguments into one shell-safe string.
qjoin() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

# Print a command as "+ quoted args"; run it unless --dry-run.
run() {
  echo "+ $(qjoin "$@")"
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

LOC=()
[[ -n "$ZONE" ]] && LOC+=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project "$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

ssh_all() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$1"; }

# ---------------------------------------------------------------- actions
if [[ "$ACTION" == "delete" ]]; then
  run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet
  exit 0
fi
if [[ "$ACTION" == "logs" ]]; then
  run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 \
    --command "tail -n 200 -F $REMOTE_DIR/logs/train.log"
  exit 0
fi
if [[ "$ACTION" == "stop" ]]; then
  # train.pid holds the pid of a session/process-group leader (setsid): kill the whole group.
  ssh_all "cd $REMOTE_DIR 2>/dev/null && if [ -f logs/train.pid ] && kill -0 \"\$(cat logs/train.pid)\" 2>/dev/null; then kill -TERM -\"\$(cat logs/train.pid)\" && echo \"\$(hostname): stopped\"; else echo \"\$(hostname): not running\"; fi; rm -f logs/train.pid"
  exit 0
fi

# 1. The slice.
if [[ $REUSE -eq 1 ]]; then
  echo "# --reuse: using existing TPU VM $NAME"
else
  CREATE=("${TPU[@]}" create "$NAME" "${LOC[@]}")
  [[ -n "$ACCEL" ]] && CREATE+=(--accelerator-type "$ACCEL")
  CREATE+=(--version "$VERSION")
  [[ -n "$CAPACITY" ]] && CREATE+=("$CAPACITY")
  DESCRIBE=("${TPU[@]}" describe "$NAME" "${LOC[@]}" --format=value\(state\))
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "+ $(qjoin "${DESCRIBE[@]}")"
    echo "# dry run: the create below runs only if describe fails (slice missing)"
    [[ -n "$ACCEL" ]] || die "--accelerator-type is required to create $NAME (or pass --reuse)"
    run "${CREATE[@]}"
  else
    echo "+ $(qjoin "${DESCRIBE[@]}")"
    if state="$("${DESCRIBE[@]}" 2>/dev/null)"; then
      echo "# $NAME exists (state: ${state:-unknown}); reusing it"
    else
      [[ -n "$ACCEL" ]] || die "$NAME does not exist and --accelerator-type was not given"
      run "${CREATE[@]}"
    fi
  fi
fi

# 2. Code + environment on every worker.
if [[ $SKIP_INSTALL -eq 0 ]]; then
  if [[ "$MODE" == "local" ]]; then
    SRC="$(cd "$SRC" && pwd)"
    TARBALL="${TMPDIR:-/tmp}/leffa_jax_src.$$.tgz"
    if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      PACK="git -C $(q "$SRC") ls-files -z --cached --others --exclude-standard | tar -C $(q "$SRC") --ignore-failed-read --null -T - -czf $(q "$TARBALL")"
    else
      PACK="tar -C $(q "$SRC") --exclude=./.venv --exclude=./.git -czf $(q "$TARBALL") ."
    fi
    echo "+ $PACK"
    if [[ $DRY_RUN -eq 0 ]]; then
      trap 'rm -f "$TARBALL"' EXIT
      bash -c "set -o pipefail; $PACK"
    fi
    run "${TPU[@]}" scp "$TARBALL" "$NAME:$REMOTE_TARBALL" "${LOC[@]}" --worker=all
    FETCH="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && rm -f $REMOTE_TARBALL"
  else
    REF="${BRANCH:-HEAD}"
    CLONE=(git clone --depth 1)
    [[ -n "$BRANCH" ]] && CLONE+=(--branch "$BRANCH")
    CLONE+=("$REPO_URL" "$REMOTE_DIR")
    FETCH="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --depth 1 origin $(q "$REF") && git -C $REMOTE_DIR reset --hard FETCH_HEAD; else $(qjoin "${CLONE[@]}"); fi"
  fi
  PY="$(q "$PYTHON")"
  PYPKG="${PYTHON##*/}"
  INSTALL="cd ~ && $FETCH && cd $REMOTE_DIR"
  INSTALL+=" && { command -v $PY >/dev/null || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(q "$PYPKG") $(q "$PYPKG-venv"); }; }"
  INSTALL+=" && { [ -x .venv/bin/python ] || $PY -m venv .venv; }"
  INSTALL+=" && .venv/bin/pip install -q -U pip"
  INSTALL+=" && .venv/bin/pip install -q -r requirements.txt -c constraints.txt"
  INSTALL+=" && .venv/bin/pip install -q $(q "$JAX_TPU") -f $LIBTPU_INDEX"
  INSTALL+=" && .venv/bin/pip install -q --no-deps -e ."
  INSTALL+=" && echo \"\$(hostname): installed\""
  ssh_all "$INSTALL"
fi

# 3. Train on all hosts at once. setsid+nohup detach it from the ssh session; every fd is
# redirected so the ssh returns right away. XLA_FLAGS is unset (no host-platform leftovers);
# LEFFA_MULTIHOST=1 makes the trainer call jax.distributed.initialize() (no args on Cloud TPU).
EXTRA_ARGS=()
if [[ -n "$EXTRA" ]]; then read -r -a EXTRA_ARGS <<<"$EXTRA"; fi
TRAIN_CMD=(env -u XLA_FLAGS JAX_PLATFORMS=tpu LEFFA_MULTIHOST=1 PYTHONUNBUFFERED=1)
TRAIN_CMD+=(${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"})
TRAIN_CMD+=(.venv/bin/python -m leffa_jax.train --config "$CONFIG" --workdir "$WORKDIR")
TRAIN_CMD+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} ${PASS_ARGS[@]+"${PASS_ARGS[@]}"})
START="cd $REMOTE_DIR && mkdir -p logs"
START+=" && if [ -f logs/train.pid ] && kill -0 \"\$(cat logs/train.pid)\" 2>/dev/null; then echo \"\$(hostname): already training (pid \$(cat logs/train.pid)); use --stop first\" >&2; exit 1; fi"
START+=" && echo \"=== \$(date -u +%FT%TZ) start\" >> logs/train.log"
START+=" && { setsid nohup $(qjoin "${TRAIN_CMD[@]}") >> logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid; }"
START+=" && echo \"\$(hostname): started pid \$(cat logs/train.pid), log ~/$REMOTE_DIR/logs/train.log\""
ssh_all "$START"

if [[ $DRY_RUN -eq 0 ]]; then
  echo "# training started on all workers of $NAME; follow it with: $0 --name $(q "$NAME")${ZONE:+ --zone $(q "$ZONE")}${PROJECT:+ --project $(q "$PROJECT")} --logs"
fi
