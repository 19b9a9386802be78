#!/bin/bash
# Plain sbatch, no submitit: what launch/submit.py does, for users who submit scripts by hand.
# One task per GPU; every task gets torchrun-style env (RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT) and runs `hpcbrain train`, which starts the process group from it
# (hpcbrain.process_group.setup_distributed) and trains. Arguments after the script are configs and
# overrides:
#
#   sbatch slurm/sbatch_template.sh --cfg lsor.yaml data.store=/data/adni64.zarr
#   sbatch --nodes 4 --partition gpu slurm/sbatch_template.sh --cfg lsor.yaml   # flags win
#
# Time limit: Slurm sends USR2 to this shell SIGNAL_DELAY seconds before the limit (the
# --signal line); the trap requeues the job (up to MAX_REQUEUES times) and the requeued job
# resumes from the run folder's latest checkpoint in the same MLflow run. Preemption with
# PreemptMode=REQUEUE requeues the job the same way (it needs --requeue, set below). Work
# since the last checkpoint is redone: train.checkpoint_every_steps bounds it.
#
#SBATCH --job-name=hpcbrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # = GPUs per node: one task per GPU
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8            # data.num_workers + 1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@180          # B: to this batch shell, which requeues
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

HPCBRAIN_DIR=${HPCBRAIN_DIR:-$SLURM_SUBMIT_DIR}          # the checkout to run
PYTHON=${PYTHON:-$HPCBRAIN_DIR/.venv/bin/python}
MAX_REQUEUES=${MAX_REQUEUES:-20}
export PYTHONPATH=$HPCBRAIN_DIR${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}   # same port after a requeue
export WORLD_SIZE=$SLURM_NTASKS

requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts >= MAX_REQUEUES)); then
        echo "USR2: not requeueing job $SLURM_JOB_ID: requeued $restarts times (MAX_REQUEUES)" >&2
        return
    fi
    echo "USR2: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of $MAX_REQUEUES)" >&2
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR2

echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes, $WORLD_SIZE tasks, master $MASTER_ADDR:$MASTER_PORT" >&2
# Each task maps Slurm's ids to torchrun's names. srun runs in the background and `wait` is
# interruptible, so the USR2 trap fires as soon as the signal arrives.
srun --kill-on-bad-exit=1 bash -c \
    'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1} \
     exec "$0" -u -m hpcbrain.cli train "$@"' "$PYTHON" "$@" &
srun_pid=$!
while true; do
    wait "$srun_pid" && exit 0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || exit "$status"   # srun ended: its exit status
done                                                    # a trapped signal: keep waiting
