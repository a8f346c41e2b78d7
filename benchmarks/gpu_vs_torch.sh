#!/usr/bin/env bash
# JAX vs PyTorch on one GPU, float32 then bfloat16 mixed precision, in one prepared call (issue 5).
#
# Written for a session lent the `device` machine (one NVIDIA H200; jax with CUDA, flax, optax,
# torch with CUDA; no tensorflow-datasets, no network). The batch is read from the verified
# snapshot of the tfds splits, so TensorFlow is not needed there:
#
#   .venv/bin/python -m flaxcnn.data export .data/fashion_mnist.npz      # here, once (30 MB)
#   run(command="bash benchmarks/gpu_vs_torch.sh", carry=[".data"], timeout_s=590)
#
# It returns $OUT/gpu-<name>.{md,json,png}, $OUT/gpu-<name>-bf16.{md,json,png} and log.txt:
# copy them into benchmarks/results/ and the tables into the README. The book's batch sizes
# are used on a GPU; 3 rounds of 1 s samples keep both runs within ~8 minutes. Any machine with
# CUDA JAX and CUDA PyTorch works the same way with OUT set (default benchmarks/results).
source "$(dirname "$0")/gpu_env.sh"
for dtype in float32 bfloat16; do
  "$PY" benchmarks/bench_vs_torch.py --device gpu --dtype "$dtype" --rounds "${ROUNDS:-3}" \
    --sample-s "${SAMPLE_S:-1}" --out-dir "$OUT" ${EXTRA_ARGS:-} 2>&1 | grep -v '^[WI]0000' \
    | tee -a "$OUT/log.txt"
done
