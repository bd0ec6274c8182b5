#!/usr/bin/env bash
# FlashAttention-4 for the lent GPU machine, which has no package index. Run here (with PyPI access):
#
#   benchmarks/fa4_wheels.sh            # -> .fa4/part1, .fa4/part2 (git-ignored), ~54 MB each
#
# The wheels (~104 MiB, 92 MB of it nvidia-cutlass-dsl-libs-cu13) exceed one call's 64 MiB carry, so
# they travel in two calls made within the machine's ~30 s warm window:
#   call 1, carry [".snap", ".whl", ".fa4/part1"]:  mkdir -p /tmp/fa4 && cp ../.fa4/part1/* /tmp/fa4/
#   call 2, carry [".snap", ".whl", ".fa4/part2"]:  cp ../.fa4/part2/* /tmp/fa4/ &&
#           bash benchmarks/fa4_wheels.sh --install /tmp/fa4 /tmp/site   (it prints the PYTHONPATH to use:
#           /tmp/site and /tmp/site/nvidia_cutlass_dsl/dsl_packages, which a .pth file would add)
# and `--model.attention_backend flash` (or --use-flash-attn) picks FA4 up (module flash_attn.cute).
# Versions are pinned to what was read and checked against our call (flash-attn-4 4.0.0b36: SM90
# varlen forward and backward with sliding windows; CUDA 13 libraries; Python 3.12).
set -euo pipefail
if [[ ${1:-} == --install ]]; then
    src=${2:?usage: fa4_wheels.sh --install WHEEL_DIR TARGET}; target=${3:?usage: fa4_wheels.sh --install WHEEL_DIR TARGET}
    cat "$src"/cutlass_libs_cu13.part.* > "$src/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    rm "$src"/cutlass_libs_cu13.part.*
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" "$src"/*.whl
    # nvidia-cutlass-dsl puts its `cutlass` package on sys.path from a .pth file, which Python reads
    # only in site directories, not in a --target folder on PYTHONPATH: add that folder by hand
    echo "installed into $target: $(ls "$src" | wc -l) wheels; use"
    echo "export PYTHONPATH=\$PYTHONPATH:$target:$target/nvidia_cutlass_dsl/dsl_packages"
    exit 0
fi
out=.fa4
rm -rf "$out" && mkdir -p "$out/all" "$out/part1" "$out/part2"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$out/all" "$@"; }
get --pre "flash-attn-4==4.0.0b36"
# libs-core holds the `cutlass.cute` Python package itself (libs-base only the MLIR bindings);
# cuda-pathfinder is what cuda-bindings 13 loads libraries with
get "nvidia-cutlass-dsl==4.8.1" "nvidia-cutlass-dsl-libs-base==4.8.1" "nvidia-cutlass-dsl-libs-core==4.8.1" \
    "nvidia-cutlass-dsl-libs-cu13==4.8.1" "cuda-pathfinder==1.9.1"
get "cuda-bindings==13.5.0" "apache-tvm-ffi==0.1.15.post2" "torch-c-dlpack-ext==0.1.5" "quack-kernels==0.6.5" \
    "einops==0.8.1" "protobuf==6.33.1"
big=$(ls "$out"/all/nvidia_cutlass_dsl_libs_cu13-*.whl)
# part 1: every small wheel and the first 37 MB of the big one; part 2: the rest of the big one
split -b 37000000 -d -a 2 "$big" "$out/all/cutlass_libs_cu13.part."
rm "$big"
mv "$out"/all/cutlass_libs_cu13.part.00 "$out"/all/*.whl "$out/part1/"
mv "$out"/all/cutlass_libs_cu13.part.* "$out/part2/"
rmdir "$out/all"
du -sh "$out/part1" "$out/part2"
