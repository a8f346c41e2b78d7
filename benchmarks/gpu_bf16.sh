#!/usr/bin/env bash
# bfloat16 vs float32 training throughput on one GPU, in one prepared call.
#
# Written for a session that is lent the `device` machine (one NVIDIA H200; its image has
# python3 3.12 with jax 0.11.2 + the CUDA 13 plugin, flax, optax, orbax-checkpoint, numpy,
# tqdm, matplotlib; flaxcnn needs no install: PYTHONPATH=. and synthetic data, so neither the
# data set nor tensorflow-datasets has to travel). From the repository root, one `run` call:
#
#   run(command="bash benchmarks/gpu_bf16.sh", timeout_s=540)
#
# then copy the three files it returns (bf16_gpu.md, bf16_gpu.json, log.txt) into
# benchmarks/results/ and commit them. Budget: the machine's start (about 1-2 min) plus ~7 min
# here; the script starts no new network after BUDGET_S seconds (default 400), and writes its
# table after every row, so a stopped run still returns what it measured. Pass fewer networks
# to be quicker, e.g. `bash benchmarks/gpu_bf16.sh --models lenet_bn,resnet18,alexnet`.
#
# Without the tool (any machine with a CUDA JAX): `OUT=benchmarks/results bash
# benchmarks/gpu_bf16.sh`.
source "$(dirname "$0")/gpu_env.sh"
"$PY" benchmarks/gpu_bf16.py --out "$OUT" --budget-s "${BUDGET_S:-400}" "$@" 2>&1 \
  | tee -a "$OUT/log.txt"
