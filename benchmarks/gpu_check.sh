#!/bin/sh
# GPU check of seed-004's pipelines (benchmarks/gpu_check.py): training samples/s of the seed-style, grouped and
# feature-cache paths, evaluation images/s, peak GPU memory, the one-time passes and the projected seed-004 time,
# on a BLIP-base-shaped model with random weights and a synthetic Flickr8k-sized image folder. Nothing is
# downloaded; the last line of stdout is one JSON line, progress goes to stderr.
#
#   sh benchmarks/gpu_check.sh                         # one CUDA GPU: under 8 min on an H200 with 16 CPU cores
#   sh benchmarks/gpu_check.sh --quick                 # CPU smoke run of the same code paths (~1 min)
#   sh benchmarks/gpu_check.sh --json_out gpu.json --workdir /scratch   # flags: gpu_check.py --help
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
python="$root/.venv/bin/python"
if [ ! -x "$python" ]; then
    python=$(command -v python3 || command -v python)
    echo "gpu_check.sh: no $root/.venv (make setup creates it); using $python" >&2
fi
cd "$root"
exec "$python" benchmarks/gpu_check.py "$@"
