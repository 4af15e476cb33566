#!/bin/bash
# Distillation on one machine: one rank per GPU, or N CPU ranks (gloo) where there is no GPU.
#
#   launch/local_distill.sh CONFIG [section.key=value ...]
#   KD_NPROC_PER_NODE=2 launch/local_distill.sh configs/tiny_cpu.yaml data.shards=DIR/shards data.tokenizer=DIR/tok
#
# Hyperparameters live in the YAML; overrides pass through untouched. Running the same command again resumes from
# the newest complete checkpoint in run.output_dir. Ctrl-C, TERM or USR1 to this script asks the ranks to save at
# the next step boundary; the script then exits 75 ("stopped early, resume me": run it again). A second Ctrl-C or
# TERM while they save aborts them at once (no checkpoint of that step). (Started with `&` from a script, the job
# has SIGINT ignored from the start, as POSIX shells do for background jobs, and no shell can trap it then: stop
# such a run with TERM or USR1.)
#
# The script starts the ranks itself (RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* for kd_pipeline.runtime), each in a
# session of its own: a terminal's Ctrl-C reaches only this script, which turns it into a stop request, and no
# launcher stands between the ranks and their exit codes (torchrun turns every failure into 1, DeepSpeed's
# launcher dies of USR1 and kills the ranks on TERM). When one rank fails, the others are ended (TERM, then KILL
# after 10 s), as srun --kill-on-bad-exit does. Local rank r uses the r-th visible GPU, so CUDA_VISIBLE_DEVICES=2,3
# runs the two ranks on GPUs 2 and 3.
#
# Knobs (environment): KD_NPROC_PER_NODE ranks (default: the visible GPUs, else 1 CPU rank), KD_PYTHON interpreter
# (default: .venv/bin/python if present, else python), MASTER_PORT (default 29500).
#
# Exit codes: those of kd_pipeline.train (0 finished, 75 stopped early, 2 bad configuration or input; the first
# failing rank's code otherwise), 2 for bad arguments to this script, 130 when aborted by a second Ctrl-C/TERM.

set -uo pipefail

RESUME_EXIT_CODE=75
KILL_WAIT_SECONDS=10

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
command -v setsid > /dev/null || die "setsid (util-linux) is needed to start the ranks in sessions of their own"

if [ -z "${KD_PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then KD_PYTHON="$REPO/.venv/bin/python"; else KD_PYTHON=python; fi
fi
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
else
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
gpus=${gpus:-0}
if [ -z "${KD_NPROC_PER_NODE:-}" ]; then
    KD_NPROC_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
fi
[[ "$KD_NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
    || die "KD_NPROC_PER_NODE=$KD_NPROC_PER_NODE is not a positive integer: set it to the number of ranks"
if [ "$gpus" -gt 0 ] && [ "$KD_NPROC_PER_NODE" -gt "$gpus" ]; then
    die "KD_NPROC_PER_NODE=$KD_NPROC_PER_NODE ranks but $gpus visible GPUs: one rank per GPU"
fi

batch="$("$KD_PYTHON" -m kd_pipeline.plan --config "$CONFIG" --world-size "$KD_NPROC_PER_NODE" \
    --gpus-per-node "$KD_NPROC_PER_NODE" --batch-only "$@")" || exit $?
echo "local_distill.sh: world size $KD_NPROC_PER_NODE; $batch" >&2

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTHONUNBUFFERED=1
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29500}" WORLD_SIZE="$KD_NPROC_PER_NODE"
command=("$KD_PYTHON" -u -m kd_pipeline.train --config "$CONFIG" "$@")
echo "local_distill.sh: $KD_NPROC_PER_NODE x ${command[*]}" >&2

# Signals are only noted in the traps; the polling loop acts on them (bash's `wait`, interrupted by a trapped
# signal, can lose the exit code of a child that died meanwhile).
stop_requested=""
stopping=0
trap 'stop_requested=INT' INT
trap 'stop_requested=TERM' TERM
trap 'stop_requested=USR1' USR1
ranks=()
for ((local_rank = 0; local_rank < KD_NPROC_PER_NODE; local_rank++)); do
    # A non-interactive shell starts background commands in its own process group, so setsid need not fork: the
    # rank's pid is the pid of its session and process group.
    RANK=$local_rank LOCAL_RANK=$local_rank setsid "${command[@]}" &
    ranks+=($!)
done

signal_ranks() {  # signal_ranks SIGNAL [group]: each running rank, or its whole process group (workers included)
    for pid in "${ranks[@]}"; do
        if [ "${2:-}" = group ]; then kill "-$1" -- "-$pid" 2>/dev/null || true; else kill "-$1" "$pid" 2>/dev/null || true; fi
    done
}

declare -A codes=()
failure=""
kill_deadline=""
while [ ${#codes[@]} -lt ${#ranks[@]} ]; do
    if [ -n "$stop_requested" ]; then
        if [ "$stopping" = 1 ] && [ "$stop_requested" != USR1 ]; then
            echo "local_distill.sh: $stop_requested again: aborting the ranks without a checkpoint" >&2
            signal_ranks KILL group
            exit 130
        fi
        echo "local_distill.sh: $stop_requested received: asking the ranks to save and stop" \
             "(Ctrl-C again to abort)" >&2
        stop_requested=""
        stopping=1
        signal_ranks USR1
    fi
    for pid in "${ranks[@]}"; do
        if [ -z "${codes[$pid]:-}" ] && ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            codes[$pid]=$?
            if [ "${codes[$pid]}" != 0 ] && [ "${codes[$pid]}" != "$RESUME_EXIT_CODE" ] && [ -z "$failure" ]; then
                failure="${codes[$pid]}"
                echo "local_distill.sh: a rank (pid $pid) failed with exit code $failure: ending the others" >&2
                signal_ranks TERM
                kill_deadline=$((SECONDS + KILL_WAIT_SECONDS))
            fi
        fi
    done
    if [ -n "$kill_deadline" ] && [ "$SECONDS" -ge "$kill_deadline" ]; then
        signal_ranks KILL group
        kill_deadline=""
    fi
    [ ${#codes[@]} -lt ${#ranks[@]} ] && { sleep 1 || true; }
done
if [ -n "$failure" ]; then exit "$failure"; fi
for code in "${codes[@]}"; do
    if [ "$code" = "$RESUME_EXIT_CODE" ]; then exit "$RESUME_EXIT_CODE"; fi
done
exit 0
