# Sourced by the benchmarks/gpu_*.sh scripts: the repository root as working directory, OUT
# (default benchmarks/results) created, PY, the dataset snapshot and flaxcnn importable without
# an install, and the machine's GPU and library versions as the first lines of $OUT/log.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export FLAXCNN_FASHION_MNIST_NPZ="${FLAXCNN_FASHION_MNIST_NPZ:-$PWD/.data/fashion_mnist.npz}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/log.txt"
