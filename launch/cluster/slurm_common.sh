# Sourced by launch/cluster/*.sbatch: argument checks, rendezvous address and the preemption path, shared
# so that one node, many nodes and the CPU variant behave the same way.
#
# Preemption contract: SLURM sends USR1 to this batch shell <grace> seconds before the time limit
# (#SBATCH --signal=B:USR1@<grace>) or when an admin/test does `scancel -b -s USR1 <job>`. The trap
# forwards USR1 to the training step (srun relays it to every task on every node; the per-node
# launcher relays it to the trainer processes), waits until the trainer has written its checkpoint
# and exited, then requeues the job. The requeued job runs this script again from the top with
# SLURM_RESTART_COUNT incremented, and `--resume auto` continues from checkpoints/latest.

selfsup_die() {
    echo "selfsup: error: $*" >&2
    exit 2
}

selfsup_log() {
    echo "selfsup: $(date '+%F %T') $*"
}

# selfsup_parse_args CONFIG SHARDS RUN_DIR [key=value ...]
# Sets SELFSUP_CONFIG, SELFSUP_SHARDS, SELFSUP_RUN_DIR (absolute) and SELFSUP_OVERRIDES (array).
selfsup_parse_args() {
    if (($# < 3)); then
        selfsup_die "expected CONFIG SHARDS RUN_DIR [key=value ...], got $# argument(s): $*
usage: sbatch [options] launch/cluster/<script>.sbatch configs/simclr.yaml /shared/shards/train /shared/runs/exp1 train.epochs=100"
    fi
    local config=$1 shards=$2 run_dir=$3
    shift 3
    SELFSUP_OVERRIDES=("$@")
    [[ -f $config ]] || selfsup_die "config file not found: '$config' (relative paths are resolved from the submit directory $PWD)"
    case $shards in
        *://* | pipe:*) ;; # a remote shard set: only the trainer can check it
        *)
            [[ -d $shards ]] || selfsup_die "shards path not found: '$shards' (write it with 'selfsup shards' on a file system every node mounts)"
            [[ -f $shards/manifest.json ]] || selfsup_die "shards path '$shards' has no manifest.json: not a shard set written by 'selfsup shards'"
            shards=$(realpath -- "$shards")
            ;;
    esac
    [[ -n $run_dir ]] || selfsup_die "run directory is empty"
    local parent
    parent=$(dirname -- "$run_dir")
    [[ -d $parent ]] || selfsup_die "run directory '$run_dir' cannot be created: its parent '$parent' does not exist (create the parent on a shared file system)"
    mkdir -p -- "$run_dir" || selfsup_die "cannot create run directory '$run_dir'"
    [[ -w $run_dir ]] || selfsup_die "run directory '$run_dir' is not writable"
    SELFSUP_CONFIG=$(realpath -- "$config")
    SELFSUP_SHARDS=$shards
    SELFSUP_RUN_DIR=$(realpath -- "$run_dir")
    # What every node's launcher runs: the trainer resumes from the run's latest checkpoint if
    # there is one, which is what makes a requeued job continue instead of starting over.
    # (Options before the key=value list: argparse cannot take options between positionals.)
    SELFSUP_TRAIN_ARGS=(-m selfsup.launch.cli pretrain --config "$SELFSUP_CONFIG" --resume auto
        "data.train=$SELFSUP_SHARDS" "run_dir=$SELFSUP_RUN_DIR" "${SELFSUP_OVERRIDES[@]}")
}

# selfsup_rendezvous: MASTER_ADDR = first node of the allocation, MASTER_PORT derived from the job id
# (stable across requeues, different for jobs sharing a node). Override either by exporting it.
selfsup_rendezvous() {
    if [[ -z ${MASTER_ADDR:-} ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    fi
    MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
}

selfsup_on_preempt() {
    SELFSUP_PREEMPTED=1
    selfsup_log "USR1 received (time limit or preemption): asking the trainer to checkpoint"
    [[ -n ${SELFSUP_STEP_PID:-} ]] && kill -s USR1 "$SELFSUP_STEP_PID" 2>/dev/null
    return 0
}

# selfsup_run_step SRUN_ARGS... -- COMMAND...: one srun step with the preemption trap around it.
# Returns the step's exit code; on preemption requeues the job and exits this script.
selfsup_run_step() {
    SELFSUP_PREEMPTED=0
    trap selfsup_on_preempt USR1
    srun "$@" &
    SELFSUP_STEP_PID=$!
    local rc=0
    # `wait` returns early (status > 128) whenever the trap runs; keep waiting for the real exit.
    while true; do
        wait "$SELFSUP_STEP_PID" && rc=0 || rc=$?
        kill -0 "$SELFSUP_STEP_PID" 2>/dev/null || break
    done
    trap - USR1
    if ((SELFSUP_PREEMPTED)); then
        selfsup_log "training step exited ($rc) after the checkpoint; requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
        scontrol requeue "$SLURM_JOB_ID" || selfsup_die "scontrol requeue $SLURM_JOB_ID failed; resubmit by hand, the run resumes from $SELFSUP_RUN_DIR/checkpoints/latest"
        exit 0
    fi
    return "$rc"
}

# selfsup_gpus_per_node: trainer processes per node = GPUs SLURM gave this job on a node
# (SELFSUP_NPROC_PER_NODE overrides). Fails when there are none rather than training on the CPU.
selfsup_gpus_per_node() {
    local n=${SELFSUP_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [[ -z $n && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    fi
    if [[ -z $n ]]; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || n=0
    fi
    [[ $n =~ ^[1-9][0-9]*$ ]] || selfsup_die "no GPUs in this job (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}', CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'): request them with --gpus-per-node, set SELFSUP_NPROC_PER_NODE, or use launch/cluster/pretrain_cpu.sbatch"
    echo "$n"
}
