#!/bin/bash
# Distillation on a Slurm cluster: one task per node, each starting `deepspeed --no_ssh` for the ranks of its node.
#
#   mkdir -p slurm_logs                       # Slurm does not create the folder of --output/--error
#   sbatch launch/slurm_distill.sh configs/geochat_13b_to_7b.yaml [section.key=value ...]
#
# Submit from the repository root (the job runs there: $SLURM_SUBMIT_DIR, or $KD_REPO). Hyperparameters live in
# the YAML only; this script passes the overrides through untouched. Resubmitting the same command, or Slurm
# requeueing the job, resumes from the newest complete checkpoint in run.output_dir.
#
# Time limits and preemption: Slurm sends USR1 to this shell 600 s before the end (--signal=B:USR1@600). The trap
# forwards it (as USR1) through srun to every node, where the node script hands it to the training processes; they
# agree at the next step boundary, save a checkpoint and exit with 75 ("stopped early, resume me"), and this shell
# then runs `scontrol requeue $SLURM_JOB_ID`. A TERM sent to this shell is forwarded the same way. The trainer can
# also stop by itself run.stop_before_end_minutes before the job's end: SLURM_JOB_END_TIME is exported for it
# (from `scontrol show job` when Slurm does not set it).
#
# Why deepspeed --no_ssh and not torchrun: torchrun exits 1 whatever its workers returned, which would hide the 75
# that decides the requeue; deepspeed's launcher passes the ranks' exit code through. Node ranks come from each
# node's own SLURM_PROCID (expanded on the node, not here).
#
# Crash instead of hang: srun --kill-on-bad-exit=1 ends every node when one fails; the process-group timeout
# (deepspeed.timeout_minutes in the YAML) makes a rank waiting for a dead or stuck peer fail within it;
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1 lets NCCL's watchdog abort on that timeout.
#
# Knobs (environment): KD_NPROC_PER_NODE ranks per node (default: GPUs on the node; set it for CPU ranks),
# KD_PYTHON interpreter (default: .venv/bin/python if present, else python), MASTER_PORT (default from the job id),
# KD_REPO repository root, KD_STATUS_DIR per-node exit codes (default slurm_logs/status/<job id>, shared storage).
#
# Exit codes: 0 finished; 75 stopped early and requeued; 2 bad arguments; anything else: the failure of a node.
#
#SBATCH --job-name=kd_distill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm_logs/%x-%j.out
#SBATCH --error=slurm_logs/%x-%j.err

set -euo pipefail

RESUME_EXIT_CODE=75

die() {
    echo "slurm_distill.sh: error: $*" >&2
    exit 2
}

[ $# -ge 1 ] || die "usage: sbatch launch/slurm_distill.sh CONFIG [section.key=value ...]"
[ -n "${SLURM_JOB_ID:-}" ] || die "SLURM_JOB_ID is not set: submit with sbatch (or use launch/local_distill.sh)"
REPO="${KD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -d "$REPO/kd_pipeline" ] || die "$REPO is not the repository root: submit from it or set KD_REPO"
cd "$REPO"
CONFIG="$1"
shift
[ -f "$CONFIG" ] || die "config $CONFIG does not exist (paths are relative to $REPO)"

if [ -z "${KD_PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then KD_PYTHON="$REPO/.venv/bin/python"; else KD_PYTHON=python; fi
fi
if [ -z "${KD_NPROC_PER_NODE:-}" ]; then
    KD_NPROC_PER_NODE="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}"
fi
[[ "$KD_NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
    || die "no GPUs found on the node: set KD_NPROC_PER_NODE to the number of ranks per node"

mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ ${#HOSTS[@]} -ge 1 ] || die "scontrol show hostnames \"$SLURM_JOB_NODELIST\" returned no host"
MASTER_ADDR="${HOSTS[0]}"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

if [ -z "${SLURM_JOB_END_TIME:-}" ]; then
    end_time="$(scontrol show job "$SLURM_JOB_ID" | grep -o 'EndTime=[^ ]*' | head -n 1 | cut -d= -f2 || true)"
    if [ -n "$end_time" ] && end_epoch="$(date -d "$end_time" +%s 2>/dev/null)"; then
        SLURM_JOB_END_TIME="$end_epoch"
    fi
fi

KD_STATUS_DIR="${KD_STATUS_DIR:-$REPO/slurm_logs/status/$SLURM_JOB_ID}"
mkdir -p "$KD_STATUS_DIR"
rm -f "$KD_STATUS_DIR"/node*.rc  # a requeued job starts over with the same id

export MASTER_ADDR MASTER_PORT KD_PYTHON KD_NPROC_PER_NODE KD_STATUS_DIR
export SLURM_JOB_END_TIME="${SLURM_JOB_END_TIME:-}"
export KD_HOSTS="${HOSTS[*]}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"  # the name older torch versions read
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1

# Runs once per node (srun task), so SLURM_PROCID and the node's own TMPDIR are read there.
read -r -d '' NODE_SCRIPT <<'NODE' || true
set -uo pipefail
node_rank="$SLURM_PROCID"
hostfile="${TMPDIR:-/tmp}/kd_hostfile_${SLURM_JOB_ID}_${node_rank}"
for host in $KD_HOSTS; do echo "$host slots=$KD_NPROC_PER_NODE"; done > "$hostfile"
command=("$KD_PYTHON" -u -m deepspeed.launcher.runner --no_ssh --node_rank "$node_rank" --hostfile "$hostfile"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module kd_pipeline.train --config "$@")
echo "node $node_rank ($(hostname)): ${command[*]}" >&2
# The ranks are the launcher's grandchildren (runner -> launch -> ranks); the launchers themselves would die of
# USR1, so only the ranks get it. The trap only notes the signal and a polling loop forwards it: bash's `wait`,
# once interrupted by a trapped signal, can report -1 instead of the exit code of a child that died meanwhile.
stop_requested=0
trap 'stop_requested=1' USR1 TERM
"${command[@]}" &
launcher=$!
while kill -0 "$launcher" 2>/dev/null; do
    if [ "$stop_requested" = 1 ]; then
        stop_requested=0
        for launch_pid in $(pgrep -P "$launcher"); do pkill -USR1 -P "$launch_pid" || true; done
    fi
    sleep 1
done
wait "$launcher"
rc=$?
if [ "$rc" != 0 ]; then
    first_rank=$((node_rank * KD_NPROC_PER_NODE))
    echo "node $node_rank ($(hostname)): ranks $first_rank-$((first_rank + KD_NPROC_PER_NODE - 1)) ended with" \
         "exit code $rc" >&2
fi
echo "$rc" > "$KD_STATUS_DIR/node${node_rank}.rc"
rm -f "$hostfile"
exit "$rc"
NODE

# As on the nodes: the trap notes the signal, the polling loop forwards it (srun passes USR1 on to every node).
stop_requested=""
stop_received=0
trap 'stop_requested=USR1' USR1
trap 'stop_requested=TERM' TERM
srun --nodes="${#HOSTS[@]}" --ntasks="${#HOSTS[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c "$NODE_SCRIPT" kd-node "$CONFIG" "$@" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do
    if [ -n "$stop_requested" ]; then
        echo "slurm_distill.sh: $stop_requested received: asking the training processes to save and stop" >&2
        stop_requested=""
        stop_received=1
        kill -USR1 "$srun_pid" 2>/dev/null || true
    fi
    sleep 1
done
set +e
wait "$srun_pid"
rc=$?
set -e
trap - USR1 TERM

# srun's own status is the worst of its tasks, including those --kill-on-bad-exit ended after the first node
# exited 75; each node's recorded launcher status tells whether training stopped early after saving.
stopped=0
for status_file in "$KD_STATUS_DIR"/node*.rc; do
    if [ -f "$status_file" ] && [ "$(cat "$status_file")" = "$RESUME_EXIT_CODE" ]; then stopped=1; fi
done
if [ "$stopped" = 1 ]; then
    echo "slurm_distill.sh: training stopped early after a checkpoint (signal received: $stop_received);" \
         "requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID" \
        || echo "slurm_distill.sh: requeue failed: resubmit the same command to resume" >&2
    exit "$RESUME_EXIT_CODE"
fi
echo "slurm_distill.sh: training ended with exit code $rc" >&2
exit "$rc"
