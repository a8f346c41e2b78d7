#!/usr/bin/env bash
# Builds oneDNN 3.7.2 from Debian 13's source package into a prefix, for
# FLAXCNN_ONEDNN_PREFIX (flaxcnn/onednn.py) and layer_choice_ab.py's onednn-prefix arm:
#
#     bash benchmarks/build_onednn.sh /opt/onednn-3.7
#     python benchmarks/layer_choice_ab.py --arms default onednn-prefix --onednn-prefix /opt/onednn-3.7
#
# Only what _onednn.cc uses (convolutions, reorders), CPU only, OpenMP: 15-17 min on the
# 2-core machine. Needs cmake, ninja, g++ and deb.debian.org. Measured and not adopted as the
# default (benchmarks/xla_cpu_study.md).
set -euo pipefail
prefix=$(realpath -m "${1:?usage: build_onednn.sh PREFIX}")
url=http://deb.debian.org/debian/pool/main/o/onednn/onednn_3.7.2%2Bds.orig.tar.xz
sha=0cc51ca26c1af6a2bb1e71e378e7046f3ceb3e71791ee9d4e246d50f904a6ea6
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsSL -o "$work/src.tar.xz" "$url"
echo "$sha  $work/src.tar.xz" | sha256sum -c --quiet
mkdir "$work/src" && tar -xJf "$work/src.tar.xz" -C "$work/src" --strip-components=1
cmake -S "$work/src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$prefix" -DONEDNN_BUILD_TESTS=OFF -DONEDNN_BUILD_EXAMPLES=OFF \
  -DONEDNN_BUILD_GRAPH=OFF -DONEDNN_CPU_RUNTIME=OMP \
  -DONEDNN_GPU_RUNTIME=NONE -DONEDNN_ENABLE_PRIMITIVE="CONVOLUTION;REORDER" \
  -DONEDNN_ENABLE_WORKLOAD=TRAINING -DONEDNN_ENABLE_JIT_PROFILING=OFF >"$work/cmake.log"
ninja -C "$work/build" install >"$work/build.log" || { tail -40 "$work/build.log"; exit 1; }
test -f "$prefix/include/oneapi/dnnl/dnnl.hpp"
echo "oneDNN 3.7.2 installed in $prefix: FLAXCNN_ONEDNN_PREFIX=$prefix"
