#!/bin/bash
# Multi-node fine-tuning on Slurm: one `accelerate launch` per node, c10d rendezvous on the first node.
#   sbatch configs/accelerate/slurm_multinode.sh configs/blip_base_lora.yaml /scratch/run1 --dataset_dir /data/flickr8k
# OUTPUT_DIR must be on a disk every node sees. When a node fails or hangs, the others stop within --ddp_timeout
# seconds (1800 unless a flag or the config sets it); requeued (sbatch --requeue), the job continues from the last
# complete checkpoint in the output folder.
#SBATCH --job-name=blip-caption
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch slurm_multinode.sh RUN_CONFIG.yaml OUTPUT_DIR [run_captioning flags...]}
OUTPUT_DIR=${2:?usage: sbatch slurm_multinode.sh RUN_CONFIG.yaml OUTPUT_DIR [run_captioning flags...]}
shift 2
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# sed, not head: head would stop reading a long node list, and scontrol's SIGPIPE then fails the job (pipefail).
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PORT=${MAIN_PORT:-29500}

RESUME=""
if ls -d "$OUTPUT_DIR"/checkpoint-* > /dev/null 2>&1; then
    RESUME="--resume_from_checkpoint latest"
fi

srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --config_file configs/accelerate/multi_node.yaml \
    --num_machines $SLURM_NNODES \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_HOST \
    --main_process_port $MAIN_PORT \
    --rdzv_backend c10d \
    run_captioning.py --config $CONFIG --output_dir $OUTPUT_DIR $RESUME $*"
