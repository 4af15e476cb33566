#!/bin/bash
# Distillation on one machine: one rank per GPU, or N CPU ranks (gloo) where there is no GPU.
#
#   launch/local_distill.sh CONFIG [section.key=value ...]
#   KD_NPROC_PER_NODE=2 launch/local_distill.sh configs/tiny_cpu.yaml data.shards=DIR/shards data.tokenizer=DIR/tok
#
# Hyperparameters live in the YAML; overrides pass through untouched. Running the same command again resumes from
# the newest complete checkpoint in run.output_dir. USR1 or TERM to this script asks the ranks to save at the next
# step boundary; the script then exits 75 ("stopped early, resume me": run it again).
#
# The ranks are started by DeepSpeed's launcher, as on Slurm (launch/slurm_distill.sh), because it passes the
# ranks' exit code through (torchrun turns every failure into 1).
#
# Knobs (environment): KD_NPROC_PER_NODE ranks (default: the GPU count, else 1 CPU rank), KD_PYTHON interpreter
# (default: .venv/bin/python if present, else python), MASTER_PORT (default 29500).
#
# Exit codes: those of kd_pipeline.train (0 finished, 75 stopped early, 2 bad configuration or input), or 2 for
# bad arguments to this script.

set -uo pipefail

die() {
    echo "local_distill.sh: error: $*" >&2
    exit 2
}

[ $# -ge 1 ] || die "usage: launch/local_distill.sh CONFIG [section.key=value ...]"
REPO="${KD_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$REPO" || die "cannot enter $REPO"
CONFIG="$1"
shift
[ -f "$CONFIG" ] || die "config $CONFIG does not exist (paths are relative to $REPO)"

if [ -z "${KD_PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then KD_PYTHON="$REPO/.venv/bin/python"; else KD_PYTHON=python; fi
fi
if [ -z "${KD_NPROC_PER_NODE:-}" ]; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    KD_NPROC_PER_NODE=$(( ${gpus:-0} > 0 ? ${gpus:-0} : 1 ))
fi
[[ "$KD_NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "KD_NPROC_PER_NODE must be a positive integer"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTHONUNBUFFERED=1

hostfile="$(mktemp "${TMPDIR:-/tmp}/kd_hostfile.XXXXXX")"
echo "localhost slots=$KD_NPROC_PER_NODE" > "$hostfile"
command=("$KD_PYTHON" -u -m deepspeed.launcher.runner --no_ssh --node_rank 0 --hostfile "$hostfile" --master_addr 127.0.0.1
         --master_port "${MASTER_PORT:-29500}" --module kd_pipeline.train --config "$CONFIG" "$@")
echo "local_distill.sh: ${command[*]}" >&2

# The ranks are the launcher's grandchildren (runner -> launch -> ranks); the launchers themselves would die of
# USR1, so only the ranks get it. The trap only notes the signal and a polling loop forwards it: bash's `wait`,
# once interrupted by a trapped signal, can report -1 instead of the exit code of a child that died meanwhile.
stop_requested=""
trap 'stop_requested=USR1' USR1
trap 'stop_requested=TERM' TERM
"${command[@]}" &
launcher=$!
while kill -0 "$launcher" 2>/dev/null; do
    if [ -n "$stop_requested" ]; then
        echo "local_distill.sh: $stop_requested received: asking the ranks to save and stop" >&2
        stop_requested=""
        for launch_pid in $(pgrep -P "$launcher"); do pkill -USR1 -P "$launch_pid" || true; done
    fi
    sleep 1
done
wait "$launcher"
rc=$?
rm -f "$hostfile"
exit "$rc"
