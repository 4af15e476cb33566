#!/bin/bash
# Shard GeoChat instruction data on a Slurm cluster: an array job whose tasks each write a disjoint share of the
# planned shards, then one dependent job that checks every shard and writes the one manifest.json/rejects.jsonl.
#
#   mkdir -p slurm_logs
#   bash launch/slurm_data_prep.sh --tasks 16 -- --instruct GeoChat_Instruct.json --images /data/geochat/images \
#       --out /data/geochat/shards [--seed 0 --max-shard-mb 512 ...]
#
# Run it with bash on the login node, from the repository root: it submits the array (tasks 0..N-1) and the merge
# job (--dependency=afterok on the whole array) and prints both job ids. Submitting the array yourself works too
# (mkdir -p slurm_logs && sbatch --array=0-15 launch/slurm_data_prep.sh --instruct ... --out ...): its first task
# then submits the merge job, with the same dependency. Every task receives the same data_prep
# arguments, so every task computes the same plan (the plan depends on the seed, the records and the image sizes
# only) and writes shard i of it when i % N equals its SLURM_ARRAY_TASK_ID: shard names never collide. A failed or
# requeued task redoes only its missing shards (a task reuses its verified ones); the merge refuses (exit 1, naming
# the shards) while any shard is missing, so rerun the failed tasks (sbatch --array=<ids> this script with the same
# arguments) and then the merge (KD_DATA_PREP_MERGE=1). The result is byte-identical to one `data_prep shard` run.
#
# Roles of this one file: merge (KD_DATA_PREP_MERGE=1, set on the merge job), array task (SLURM_ARRAY_TASK_ID
# set), submitter (neither). Knobs: KD_PYTHON interpreter (default .venv/bin/python if present,
# else python); the task's writer processes default to its CPUs (--workers in the arguments wins).
#
#SBATCH --job-name=kd_data_prep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=slurm_logs/%x-%A_%a.out

set -euo pipefail

die() {
    echo "slurm_data_prep.sh: error: $*" >&2
    exit 2
}

REPO="${KD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -d "$REPO/data_prep" ] || die "$REPO is not the repository root: run from it or set KD_REPO"
cd "$REPO"
if [ -z "${KD_PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then KD_PYTHON="$REPO/.venv/bin/python"; else KD_PYTHON=python; fi
fi

script="$REPO/launch/slurm_data_prep.sh"

submit_merge() {  # submit_merge ARRAY_JOB_ID DATA_PREP_ARGUMENTS...: prints the merge job's id
    local array_id="$1"
    shift
    local merge_id
    merge_id="$(sbatch --parsable --dependency="afterok:$array_id" --export="ALL,KD_DATA_PREP_MERGE=1" \
        --job-name=kd_data_prep_merge --cpus-per-task=2 --output="slurm_logs/%x-%j.out" "$script" "$@")"
    echo "${merge_id%%;*}"  # --parsable prints "id" or "id;cluster"
}

if [ "${KD_DATA_PREP_MERGE:-0}" = 1 ]; then
    exec "$KD_PYTHON" -m data_prep shard "$@" --merge
fi
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    count="${SLURM_ARRAY_TASK_COUNT:?SLURM_ARRAY_TASK_COUNT is not set: submit the array with --array=0-N}"
    if [ -z "${KD_DATA_PREP_SUBMITTED:-}" ] && [ "$SLURM_ARRAY_TASK_ID" = "${SLURM_ARRAY_TASK_MIN:-0}" ] \
            && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
        # `sbatch --array` by hand: no submitter queued the merge, so the first task does (once, not on a requeue).
        merge_id="$(submit_merge "${SLURM_ARRAY_JOB_ID:?SLURM_ARRAY_JOB_ID is not set}" "$@")"
        echo "slurm_data_prep.sh: submitted merge job $merge_id (runs after every task of array" \
             "$SLURM_ARRAY_JOB_ID succeeds)" >&2
    fi
    exec "$KD_PYTHON" -m data_prep shard --workers "${SLURM_CPUS_PER_TASK:-1}" "$@" \
        --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks "$count"
fi

# Submitter.
[ "${1:-}" = "--tasks" ] && [ $# -ge 3 ] && [ "$3" = "--" ] \
    || die "usage: bash launch/slurm_data_prep.sh --tasks N -- DATA_PREP_SHARD_ARGUMENTS"
tasks="$2"
shift 3
[[ "$tasks" =~ ^[1-9][0-9]*$ ]] || die "--tasks must be a positive integer, got $tasks"
array_id="$(sbatch --parsable --array="0-$((tasks - 1))" --export="ALL,KD_DATA_PREP_SUBMITTED=1" "$script" "$@")"
array_id="${array_id%%;*}"
merge_id="$(submit_merge "$array_id" "$@")"
echo "submitted array job $array_id ($tasks tasks) and merge job $merge_id (runs after all tasks succeed)"
