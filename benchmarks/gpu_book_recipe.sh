#!/usr/bin/env bash
# The book's recipe for all seven networks on one GPU, in one prepared call (issue 4).
#
# Written for a session lent the `device` machine (one NVIDIA H200; jax with CUDA, flax, optax,
# orbax-checkpoint, tqdm, matplotlib; no tensorflow-datasets, no network). The real dataset
# travels as the verified snapshot of the tfds splits, so TensorFlow is not needed there:
#
#   .venv/bin/python -m flaxcnn.data export .data/fashion_mnist.npz      # here, once (30 MB)
#   run(command="bash benchmarks/gpu_book_recipe.sh", carry=[".data"], timeout_s=590)
#
# (`.data/` is git-ignored.) It trains `train.py --model all` with every default (the book's
# recipe: lr, batch, epochs, side, plain SGD, Xavier init), checkpoints outside $OUT, and
# returns the log and the summary table ($OUT/book_recipe_gpu.md, .json, log.txt): copy them
# into benchmarks/results/ and the table into the README. Fewer networks: MODELS="lenet_bn
# resnet18" bash benchmarks/gpu_book_recipe.sh. Any machine with a CUDA JAX works the same way
# with OUT set (default benchmarks/results); EXTRA_ARGS="--epochs 1" passes flags to train.py.
source "$(dirname "$0")/gpu_env.sh"
WORK="${WORK:-/tmp/flaxcnn-book-recipe}"
rm -rf "$WORK"
for m in ${MODELS:-alexnet vgg nin googlenet lenet_bn_scratch lenet_bn resnet18 densenet}; do
  "$PY" train.py --model "$m" --no-progress --workdir "$WORK/$m" ${EXTRA_ARGS:-} 2>&1 | grep -v '^[WI]0000' \
    | tee -a "$OUT/log.txt"
done
"$PY" - "$WORK" "$OUT" <<'PY'
import json, os, sys
sys.argv, work, out = sys.argv[:1], sys.argv[1], sys.argv[2]
from train import book_table
reports = []
for m in sorted(os.listdir(work)):
    path = os.path.join(work, m, "report.json")
    if os.path.exists(path):
        with open(path) as f:
            reports.append(json.load(f))
with open(os.path.join(out, "book_recipe_gpu.json"), "w") as f:
    json.dump(reports, f, indent=1)
with open(os.path.join(out, "book_recipe_gpu.md"), "w") as f:
    f.write("Command: bash benchmarks/gpu_book_recipe.sh (train.py defaults: the book's recipe)\n\n")
    f.write(book_table(reports) + "\n")
print(book_table(reports))
PY
