#!/bin/bash
# Distillation on a Slurm cluster: one srun task per GPU, each task a training rank (no launcher in between).
#
#   mkdir -p slurm_logs                       # Slurm does not create the folder of --output/--error
#   sbatch launch/slurm_distill.sh configs/geochat_13b_to_7b.yaml [section.key=value ...]
#   sbatch --nodes=2 launch/slurm_distill.sh CONFIG train.global_batch_size=256    # more nodes: say the new batch
#
# Submit from the repository root (the job runs there: $SLURM_SUBMIT_DIR, or $KD_REPO). Hyperparameters live in
# the YAML only; this script passes the overrides through untouched. Resubmitting the same command, or Slurm
# requeueing the job, resumes from the newest complete checkpoint in run.output_dir.
#
# Defaults: 1 node x 8 GPUs, one task (rank) per GPU, 8 CPUs per task (4 loader workers + the rank + spare), all
# of the node's memory (--mem=0; add --exclusive where the cluster shares nodes), 24 h. This is the shipped
# configs' arithmetic (train.global_batch_size: 128 for stage 1, 64 for stage 2, on 8 GPUs). At start the job
# prints its world size and global batch (python -m kd_pipeline.plan --batch-only) and refuses, before any model
# loads, a config whose train.global_batch_size the allocation does not give.
#
# Ranks: srun starts nodes x KD_NPROC_PER_NODE tasks of `python -m kd_pipeline.train`; each reads its rank from
# SLURM_PROCID, its local rank from SLURM_LOCALID and the world size from SLURM_NTASKS (kd_pipeline.runtime).
# MASTER_ADDR is the first host of `scontrol show hostnames`. srun gets --cpus-per-task from SRUN_CPUS_PER_TASK
# or SLURM_CPUS_PER_TASK (since Slurm 22.05 srun no longer inherits sbatch's value). GPUs: local rank r uses the
# r-th GPU it can see, so an existing CUDA_VISIBLE_DEVICES is respected; with KD_SRUN_ARGS="--gpus-per-task=1"
# (or --gpu-bind=...) Slurm binds one GPU per task and each rank uses the one it sees.
#
# Signals and preemption. Slurm delivers a step's signals to every process of the step, and that is safe here:
# the ranks are the only processes of the step besides their DataLoader workers (which ignore USR1/TERM).
# - Time limit: USR1 reaches this shell 600 s before the end (--signal=B:USR1@600); it is forwarded through srun.
# - Preemption with a grace time and scancel: TERM reaches every process, ranks included.
# Either way the ranks agree at the next step boundary, save a complete checkpoint and exit 75 ("resume me"); this
# shell then runs `scontrol requeue $SLURM_JOB_ID`, at most KD_MAX_REQUEUES times (SLURM_RESTART_COUNT counts
# them), after which the job fails with a message instead of looping. The trainer can also stop by itself
# run.stop_before_end_minutes before the job's end: SLURM_JOB_END_TIME is exported for it (from `scontrol show
# job` when Slurm does not set it). Size the grace time and the --signal lead from the checkpoint's size: see
# README's operator's guide.
#
# Crash instead of hang: srun --kill-on-bad-exit=1 ends every rank when one fails; the process-group timeout
# (deepspeed.timeout_minutes) makes a rank waiting for a dead or stuck peer fail within it;
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1 lets NCCL's watchdog abort on that timeout. Each rank writes its exit code to
# KD_STATUS_DIR/rank<r>.rc before exiting, so a 75 is recognised even when --kill-on-bad-exit ended the slower
# ranks after the first one had exited 75.
#
# Knobs (environment): KD_NPROC_PER_NODE ranks per node (default: SLURM_NTASKS_PER_NODE, else the node's GPUs; set
# it for CPU ranks), KD_PYTHON interpreter (default: .venv/bin/python if present, else python), MASTER_PORT
# (default from the job id), KD_MAX_REQUEUES (default 20), KD_SRUN_ARGS extra srun options, KD_REPO repository
# root, KD_STATUS_DIR ranks' exit codes (default slurm_logs/status/<job id>, shared storage).
# NCCL (set before sbatch; srun passes the environment on): NCCL_SOCKET_IFNAME=ib0 (or eth0,...) names the network
# interface when several exist or the default one cannot reach the other nodes; NCCL_IB_HCA selects InfiniBand
# adapters, NCCL_IB_DISABLE=1 falls back to TCP; NCCL_DEBUG=WARN (or INFO, with NCCL_DEBUG_SUBSYS=INIT,NET) to see
# what NCCL chose; TORCH_NCCL_ASYNC_ERROR_HANDLING defaults to 1 here.
#
# Exit codes: 0 finished; 75 stopped early and requeued; 2 bad arguments or configuration (one line, before any
# model loads); 3 stopped early but KD_MAX_REQUEUES reached (resubmit to resume); anything else: a rank's failure.
#
#SBATCH --job-name=kd_distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm_logs/%x-%j.out
#SBATCH --error=slurm_logs/%x-%j.err

set -euo pipefail

RESUME_EXIT_CODE=75
REQUEUE_LIMIT_EXIT_CODE=3

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
node_gpus="${SLURM_GPUS_ON_NODE:-}"
if [ -z "${KD_NPROC_PER_NODE:-}" ]; then
    [ -n "$node_gpus" ] || node_gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    KD_NPROC_PER_NODE="${SLURM_NTASKS_PER_NODE:-$node_gpus}"
    [[ "$KD_NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
        || die "no GPUs found on the node: set KD_NPROC_PER_NODE to the number of ranks per node"
fi
[[ "$KD_NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
    || die "KD_NPROC_PER_NODE=$KD_NPROC_PER_NODE is not a positive integer: set it to the ranks per node"
if [[ "$node_gpus" =~ ^[1-9][0-9]*$ ]] && [ "$KD_NPROC_PER_NODE" -gt "$node_gpus" ]; then
    die "KD_NPROC_PER_NODE=$KD_NPROC_PER_NODE ranks per node but the node has $node_gpus GPUs: one rank per GPU"
fi
if [[ "${SLURM_NTASKS_PER_NODE:-}" =~ ^[1-9][0-9]*$ ]] && [ "$KD_NPROC_PER_NODE" -gt "$SLURM_NTASKS_PER_NODE" ]; then
    die "KD_NPROC_PER_NODE=$KD_NPROC_PER_NODE ranks per node but the job has $SLURM_NTASKS_PER_NODE tasks per node" \
        "(sbatch --ntasks-per-node): submit with --ntasks-per-node=$KD_NPROC_PER_NODE"
fi
KD_MAX_REQUEUES="${KD_MAX_REQUEUES:-20}"
[[ "$KD_MAX_REQUEUES" =~ ^[0-9]+$ ]] || die "KD_MAX_REQUEUES=$KD_MAX_REQUEUES is not a non-negative integer"

mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ ${#HOSTS[@]} -ge 1 ] || die "scontrol show hostnames \"$SLURM_JOB_NODELIST\" returned no host"
NODES=${#HOSTS[@]}
WORLD_SIZE=$((NODES * KD_NPROC_PER_NODE))

# Before anything heavy: the config loads and the allocation gives the batch it was designed for.
batch="$("$KD_PYTHON" -m kd_pipeline.plan --config "$CONFIG" --world-size "$WORLD_SIZE" \
    --gpus-per-node "$KD_NPROC_PER_NODE" --batch-only "$@")" || exit $?
echo "slurm_distill.sh: world size $WORLD_SIZE ($NODES node(s) x $KD_NPROC_PER_NODE ranks); $batch" >&2

export MASTER_ADDR="${HOSTS[0]}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
if [ -z "${SLURM_JOB_END_TIME:-}" ]; then
    end_time="$(scontrol show job "$SLURM_JOB_ID" | grep -o 'EndTime=[^ ]*' | head -n 1 | cut -d= -f2 || true)"
    if [ -n "$end_time" ] && end_epoch="$(date -d "$end_time" +%s 2>/dev/null)"; then
        SLURM_JOB_END_TIME="$end_epoch"
    fi
fi
export SLURM_JOB_END_TIME="${SLURM_JOB_END_TIME:-}"
export KD_STATUS_DIR="${KD_STATUS_DIR:-$REPO/slurm_logs/status/$SLURM_JOB_ID}"
mkdir -p "$KD_STATUS_DIR"
rm -f "$KD_STATUS_DIR"/rank*.rc  # a requeued job starts over with the same id
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"  # the name older torch versions read
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1

srun_options=(--nodes="$NODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$KD_NPROC_PER_NODE" --kill-on-bad-exit=1)
cpus_per_task="${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}"
[ -z "$cpus_per_task" ] || srun_options+=(--cpus-per-task="$cpus_per_task")
read -r -a extra_options <<< "${KD_SRUN_ARGS:-}"
srun_options+=(${extra_options[@]+"${extra_options[@]}"})  # the guard: bash < 4.4 calls an empty array unbound
command=("$KD_PYTHON" -u -m kd_pipeline.train --config "$CONFIG" "$@")
echo "slurm_distill.sh: srun ${srun_options[*]} ${command[*]}" >&2

# The trap only notes the signal and a polling loop forwards it: bash's `wait`, once interrupted by a trapped
# signal, can report -1 instead of the exit code of a child that died meanwhile. A TERM that reached every process
# (preemption) already reached the ranks; forwarding USR1 as well is harmless (a second stop request).
stop_requested=""
stop_received=""
trap 'stop_requested=USR1' USR1
trap 'stop_requested=TERM' TERM
srun "${srun_options[@]}" "${command[@]}" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do
    if [ -n "$stop_requested" ]; then
        echo "slurm_distill.sh: $stop_requested received: asking the ranks to save and stop" >&2
        stop_received="$stop_requested"
        stop_requested=""
        kill -USR1 "$srun_pid" 2>/dev/null || true
    fi
    sleep 1 || true  # a TERM to every process of the job ends this sleep too
done
set +e
wait "$srun_pid"
rc=$?
set -e
trap - USR1 TERM

# srun's own status is the worst of its tasks, including those --kill-on-bad-exit ended after the first rank
# exited 75; the ranks' recorded exit codes tell whether training stopped early after a complete checkpoint.
# A rank exits 75 only after the collective save completed on every rank; a rank that recorded another non-zero
# code failed, and the job is not requeued then.
stopped=0
failed=""
for status_file in "$KD_STATUS_DIR"/rank*.rc; do
    [ -f "$status_file" ] || continue
    code="$(cat "$status_file")"
    case "$code" in
        "$RESUME_EXIT_CODE") stopped=1 ;;
        0) ;;
        *) failed="${failed:-$code}" ;;
    esac
done
if [ "$stopped" = 1 ] && [ -z "$failed" ]; then
    restarts="${SLURM_RESTART_COUNT:-0}"
    if [ "$restarts" -ge "$KD_MAX_REQUEUES" ]; then
        echo "slurm_distill.sh: error: training stopped early after a checkpoint, but job $SLURM_JOB_ID was already" \
             "requeued $restarts times (KD_MAX_REQUEUES=$KD_MAX_REQUEUES): not requeueing again. Check why it" \
             "keeps stopping (run.stop_at_step, run.stop_before_end_minutes, the time limit), then resubmit the" \
             "same command to resume" >&2
        exit "$REQUEUE_LIMIT_EXIT_CODE"
    fi
    echo "slurm_distill.sh: training stopped early after a checkpoint (signal: ${stop_received:-none});" \
         "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $KD_MAX_REQUEUES)" >&2
    scontrol requeue "$SLURM_JOB_ID" \
        || echo "slurm_distill.sh: requeue failed: resubmit the same command to resume" >&2
    exit "$RESUME_EXIT_CODE"
fi
if [ -n "$failed" ]; then
    rc="$failed"  # srun's own status may be a 75 of a rank that stopped after another one failed
elif [ "$rc" = "$RESUME_EXIT_CODE" ]; then
    rc=1  # 75 means "requeued": a 75 that no rank recorded is not one
fi
echo "slurm_distill.sh: training ended with exit code $rc" >&2
exit "$rc"
