#!/usr/bin/env bash
# One per node (srun --ntasks-per-node=1): starts this node's trainer processes with
# `accelerate launch`, which joins the other nodes at MASTER_ADDR:MASTER_PORT.
#
# usage: slurm_node_launch.sh ACCELERATE_CONFIG NPROC_PER_NODE PROGRAM_ARGS...
#   e.g. slurm_node_launch.sh launch/cluster/accelerate_multi_node.yaml 8 -m selfsup.launch.cli pretrain ...
#
# Environment: MASTER_ADDR, MASTER_PORT (set by the sbatch script); SLURM_NNODES, SLURM_NODEID
# (set by srun); SELFSUP_RDZV_TIMEOUT (seconds a node waits for the others, default 300);
# SELFSUP_SHUTDOWN_TIMEOUT (seconds the trainers get to checkpoint after a signal, default 120).
set -uo pipefail

if (($# < 3)); then
    echo "selfsup: error: usage: slurm_node_launch.sh ACCELERATE_CONFIG NPROC_PER_NODE PROGRAM_ARGS..." >&2
    exit 2
fi
config=$1 per_node=$2
shift 2
: "${MASTER_ADDR:?set by the sbatch script}" "${MASTER_PORT:?set by the sbatch script}"
: "${SLURM_NNODES:?run me under srun}" "${SLURM_NODEID:?run me under srun}"
[[ -f $config ]] || { echo "selfsup: error: accelerate config not found: '$config'" >&2; exit 2; }
[[ $per_node =~ ^[1-9][0-9]*$ ]] || { echo "selfsup: error: processes per node must be a positive integer, got '$per_node'" >&2; exit 2; }
timeout=${SELFSUP_RDZV_TIMEOUT:-300}

# The elastic agent inside `accelerate launch` forwards only the signals listed here to the
# trainers, then waits the shutdown timeout before SIGKILL: USR1 must be in the list, or the
# launcher dies on it and SLURM kills the trainers mid-checkpoint.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SELFSUP_SHUTDOWN_TIMEOUT:-120}
# One thread per trainer process unless the user chose otherwise: N processes each using every
# core of the node oversubscribe it badly.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / per_node > 0 ? $(nproc) / per_node : 1 ))}

echo "selfsup: node $SLURM_NODEID/$SLURM_NNODES ($(hostname -s)): $per_node process(es), rendezvous $MASTER_ADDR:$MASTER_PORT (timeout ${timeout}s)"

# SLURM signals every process of the step, this shell included; keep it alive (a trapped signal
# is reset to default in the child, so the launcher still receives it) and wait for the launcher.
signalled=0
trap 'signalled=1' USR1
accelerate launch --config_file "$config" \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * per_node)) \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    --rdzv_conf "timeout=$timeout" --max_restarts 0 \
    "$@" &
pid=$!
while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
done
if ((signalled)) && ((rc == 0 || rc == 128 + 10)); then
    # The trainers checkpointed (rank 0 writes, every rank waits for it) and the launcher ended on
    # the forwarded USR1 (status 138). Exit 0: a non-zero status from the first node to finish makes
    # srun --kill-on-bad-exit kill the other nodes' tasks while they still shut down (rank 0 closing
    # its logs). The batch script requeues on its own preemption flag, not on this status.
    echo "selfsup: node $SLURM_NODEID: trainers stopped after USR1 (launcher status $rc)"
    rc=0
elif ((signalled)); then
    echo "selfsup: error: node $SLURM_NODEID ($(hostname -s)): launcher exited with status $rc after USR1" >&2
elif ((rc != 0)); then
    echo "selfsup: error: node $SLURM_NODEID ($(hostname -s)): launcher exited with status $rc." \
        "If the error above is a rendezvous timeout (DistStoreError / DistNetworkError), the" \
        "$SLURM_NNODES node(s) did not all meet at $MASTER_ADDR:$MASTER_PORT within ${timeout}s:" \
        "a node failed to start, or cannot reach that address (firewall, wrong interface; see" \
        "SLURM.md, Troubleshooting)." >&2
fi
exit "$rc"
