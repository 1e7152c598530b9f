#!/usr/bin/env bash
# The commands behind the GPU figures of docs/PERFORMANCE.md, on a Linux machine with an NVIDIA GPU that
# cannot download (../shared/gpu/README.md). Each appends JSON lines to $OUT/<command>.jsonl; arguments
# after the command go to its benchmark (e.g. `bash bench/gpu.sh steps --what step --quant bf16`).
#
#   setup 1   MLX's CUDA wheels (first half), diffusers, and the wheels in .gpuw   (carry .gpu1 and .gpuw)
#   setup 2   MLX's CUDA wheels (second half) and this checkout, editable          (carry .gpu2)
#   steps     transformer steps bf16/q8/q4, the quantized matmuls, the VAE decode; diffusers' anchor
#   load      diffusers' layout written, then diffusers' and mflux's load + first image from it in turn,
#             twice; an MLX-native bf16 model written, read, and its first image on an empty kernel
#             cache, then warm; the q8 and q4 models read
#   memory    the pipeline's peak memory per phase at bf16, q8 and q4
#   first     whole processes as a user types them, against diffusers' script (bench/first_image.py):
#             mflux run (HF bf16, fresh kernel caches, q8, q4, MLX-native bf16) and mflux serve's first
#             answer; one or two cases a call: `first --cases hf-bf16 --keep`, `first --cases fresh --keep`,
#             `first --cases serve,q8 --keep`, `first --cases q4,mlx-bf16` (--keep: the next call reuses the model)
#   train     the LoRA training step, mflux against diffusers + PEFT, at 512 and 1024
#   peer      mflux, diffusers and the peer (PyPI mflux 0.24.0) on one checkpoint in diffusers' layout
#   compare DIR  another tree (e.g. `git archive REV mflux converters manifests pyproject.toml README.md |
#             tar -x -C .gpuold`, carried) installed beside this one: both trees' schnell images at bf16
#             and -q 8, interleaved, twice each after a warm-up, with their step times (compare_trees.py)
#
# .gpu1 and .gpu2 come from `bash ../shared/gpu/mlx-cuda-wheels.sh`; .gpuw holds wheels downloaded here:
#   pip download --no-deps -d .gpuw mflux==0.24.0 tomli-w piexif platformdirs toml
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpuw peft==0.21.2 accelerate==1.15.0 psutil
# The machine goes back soon after a call: make `setup 2` right after `setup 1`. `SIZE=tiny
# PY=.venv/bin/python bash bench/gpu.sh <command>` runs the same on a CPU, to check it before a device call.
set -eo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}
SIZE=${SIZE:-full}
PY=${PY:-python3}
DISK=${DISK:-/var/tmp/mflux-bench} # on the machine's disk: a full-size model is 34 GB; one is kept at a time
mkdir -p "$OUT" "$DISK"
command=${1:-}
shift || true

run() { # run NAME CMD...: CMD's output to the screen and to $OUT/NAME.jsonl
  local name=$1
  shift
  echo "# $*" | tee -a "$OUT/$name.jsonl" >&2
  "$@" 2>&1 | tee -a "$OUT/$name.jsonl"
}

case "$command" in
  setup)
    if [ "${1:-}" = 1 ]; then
      { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; } | tee "$OUT/machine.txt"
      bash .gpu1/mlx-cuda-install.sh 1
      python3 -m pip install -q --no-index --no-deps .gpuw/tomli_w-*.whl .gpuw/peft-*.whl .gpuw/accelerate-*.whl \
        .gpuw/psutil-*.whl
    else
      bash .gpu2/mlx-cuda-install.sh 2
      python3 -m pip install -q --no-deps --no-build-isolation -e .
    fi
    ;;
  steps)
    run steps "$PY" bench/steps.py --size "$SIZE" "$@"
    if [ "$SIZE" = full ]; then run steps "$PY" bench/anchor_diffusers.py --compile; fi
    ;;
  load)
    hf="$DISK/hf-bf16"
    run load "$PY" bench/load.py --size "$SIZE" --layout hf --keep "$DISK" --what read "$@" # writes it
    for _ in 1 2; do
      if [ "$SIZE" = full ]; then run load "$PY" bench/peer.py run --impl diffusers --folder "$hf"; fi
      run load "$PY" bench/load.py --size "$SIZE" --folder "$hf" --what first "$@"
    done
    rm -rf "$hf"
    native="$DISK/mlx-bf16"
    run load "$PY" bench/load.py --size "$SIZE" --layout mlx --keep "$DISK" --what read "$@"
    for cache in --empty-cache ""; do
      run load "$PY" bench/load.py --size "$SIZE" --folder "$native" --what first --kernel-cache "$DISK/kernels" $cache "$@"
    done
    rm -rf "$native"
    run load "$PY" bench/load.py --size "$SIZE" --layout mlx --quant q8,q4 --tmp "$DISK" --what read "$@"
    ;;
  memory)
    run memory "$PY" bench/memory.py --size "$SIZE" --tmp "$DISK" "$@"
    ;;
  first)
    tiny=()
    [ "$SIZE" = tiny ] && tiny=(--tiny)
    run first "$PY" bench/first_image.py --disk "$DISK" --time-limit 540 "${tiny[@]}" "$@"
    ;;
  train)
    run train "$PY" bench/train.py --size "$SIZE" --steps 3 --warmup 1 "$@"
    ;;
  compare)
    other=${1:?usage: bash bench/gpu.sh compare DIR}
    shift
    for tree in old new; do rm -rf "$DISK/site-$tree"; done
    "$PY" -m pip install -q --no-deps --no-build-isolation --target "$DISK/site-old" "$other"
    "$PY" -m pip install -q --no-deps --no-build-isolation --target "$DISK/site-new" .
    hf="$DISK/hf-bf16"
    side=$([ "$SIZE" = full ] && echo 1024 || echo 64)
    [ -f "$hf/model_index.json" ] || run compare env PYTHONPATH="$DISK/site-new" "$PY" bench/peer.py write --folder "$hf" --size "$SIZE"
    for q in bf16 q8; do
      quant=()
      [ "$q" = q8 ] && quant=(-q 8)
      each() { # each ARGS...: one run of each tree
        for tree in old new; do
          run compare env PYTHONPATH="$DISK/site-$tree" "$PY" bench/compare_trees.py --folder "$hf" --side "$side" \
            "${quant[@]}" --label "$tree" "$@"
        done
      }
      each # the warm-up: fills the kernel cache for both
      each --time-steps 12
      each --time-steps 12
    done
    rm -rf "$hf"
    ;;
  peer)
    python3 -m pip install -q --no-index --no-deps --target "$DISK/peer" .gpuw/mflux-0.24.0-*.whl .gpuw/piexif-*.whl \
      .gpuw/platformdirs-*.whl .gpuw/toml-*.whl
    run peer "$PY" bench/peer.py all --folder "$DISK/peer-checkpoint" --peer "$DISK/peer" --delete "$@"
    ;;
  *)
    echo "usage: bash bench/gpu.sh setup 1|setup 2|steps|load|memory|first|train|peer|compare DIR [benchmark arguments]" >&2
    exit 2
    ;;
esac
