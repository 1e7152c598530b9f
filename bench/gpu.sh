#!/usr/bin/env bash
# The device calls behind docs/PERFORMANCE.md (issues 12 and 15), made back to back on one lent GPU
# machine (each call starts within ~30 s of the last, while the machine, what was installed and what
# was written to its disk stay). Each call stops starting new work after CALL_LIMIT seconds (default
# 530), so it ends within 9 minutes. Results go to $OUT (the device tool's output folder) as JSON lines.
#   a: carry .gpu1 and .gpuw   MLX's CUDA wheel (first half), diffusers, PEFT; the diffusers anchor
#                              (eager; torch.compile too with COMPILE=1), then diffusers + PEFT's LoRA
#                              training step at 512 and 1024 (PyTorch only: MLX is not installed yet)
#   b: carry .gpu2             MLX's CUDA wheel (second half), mflux. Where a fresh process's first run
#                              goes (probe_first.py, an empty kernel cache then the one it left); the
#                              schnell and dev steps at bf16/q8/q4 under each queue bound (runtime.memory)
#                              with their peaks; mflux's LoRA training step at 512 and 1024, bf16/q8/q4
#   c: (nothing carried)       the pipeline at bf16/q8/q4 (MLX's peak per phase, first and second image);
#                              a fresh process's first image, empty cache against warm; the Hugging Face
#                              layout's load + first image (diffusers, then mflux, fresh processes); an
#                              MLX-native model written, read at GB/s, each way of reading it probed
#                              (probe_load.py), then a pipeline from it; the VAE decode under each bound
# Round 4 (the kernel warm-up, mflux.runtime.warmup) made two calls:
#   d: carry .gpu1 and .gpuw   MLX's CUDA wheel (first half), diffusers; the Hugging Face layout checkpoint
#                              written; diffusers' load + first image from it (fresh process)
#   e: carry .gpu2             MLX's CUDA wheel (second half), mflux; mflux's load + first image from that
#                              folder in a fresh process with an empty kernel cache, warm-up off then on,
#                              then with the cache they left; the same from random weights (no load to
#                              hide behind); probe_first on an empty cache; the q4 LoRA step at 512
# and, in a second lease (after `bash .gpu1/mlx-cuda-install.sh 1` carrying .gpu1):
#   f: carry .gpu2             MLX's CUDA wheel (second half), mflux; qmatmul's own dequantize kernel against
#                              mx.dequantize (their difference, and each one's time); the steps at bf16/q8/q4
#                              with each; probe_first after the warm-up's children; the HF folder's load with
#                              8 and 16 loader threads
# Round 5 (the gathers out of the steps, the transformer read while the prompt encodes, the pipeline freeing its modulation layers as `mflux run` does) made three calls:
#   g: carry .gpu1 and .gpuw   MLX's CUDA wheel (first half), diffusers; the Hugging Face layout checkpoint
#                              written; diffusers' load + first image from it (fresh processes, twice);
#                              the diffusers anchor, eager and torch.compile
#   h: carry .gpu2             MLX's CUDA wheel (second half), mflux; the HF folder's load + first image,
#                              empty kernel cache, then warm with the overlapped read and without; random
#                              weights' first image empty against warm at bf16/q8/q4; probe_first after the
#                              warm-up; the schnell steps (round 5 also timed a "stream" dequantize, since
#                              removed: docs/PERFORMANCE.md);
#                              the pipeline at q8/q4; the VAE decode under smaller bounds
#   i: (nothing carried)       an MLX-native model written, read at GB/s with the loader's threads, then a
#                              pipeline from it; the pipeline at bf16/q8/q4 after h's fixes; the decode in
#                              row bands
#   j: carry .gpu2             (a new lease) the pipeline at bf16/q8/q4 with the modulations' tight bound
# Round 6 (a fresh process runs uncompiled while the warm-up builds; profiles):
#   k: carry .gpu2             (after `bash .gpu1/mlx-cuda-install.sh 1`, carrying .gpu1) the schnell
#                              steps at bf16/q8/q4; random weights' first image, empty kernel cache
#                              against warm, at bf16/q8/q4; the q8/q4 pipeline
#   l: (nothing carried)       the steps with qmatmul's dequantize kernel; kernel profiles
#                              (bench/profile_gpu.py, PyTorch's profiler) of the q8, bf16 and q4 steps and
#                              of the VAE decode, in 1024 MB row bands and whole-tensor
# Round 7 (issue 15's 1024² training step; l's profiles again: its profiles ran under a 2-byte queue bound):
#   a: ANCHOR=0, carry .gpu1 and .gpuw: diffusers + PEFT's training step at 512 and 1024
#   m: carry .gpu2             mflux's training step at 1024 (bf16, q8), a kernel profile of the bf16 one
#   n: (nothing carried)       l's steps with the dequantize kernel; profiles of the q8/bf16 steps, the
#                              decode in 1024 MB bands
#   o: carry .gpu2             (a new lease, after a) the decode in bands and the training steps, after the fixes
# Round 8 (the training step's queue bound; the dequantize kernel by default on CUDA, built by the warm-up;
# the group norms' statistics summed per row in both decode paths):
#   a: ANCHOR=0, carry .gpu1 and .gpuw: diffusers + PEFT's training step at 512 and 1024
#   p: carry .gpu2             mflux's bf16 training step at 1024 under each queue bound, the q8 base's under
#                              two; the decode in bands and whole, each against a float32 decode
#   r: carry .gpu2             (a new lease, after `bash .gpu1/mlx-cuda-install.sh 1`) where the dequantize
#                              kernel's module goes: probe_first on an empty cache, then warm, then with the
#                              warm-up; a fresh process's first q8 image, empty against warm
#   s: (nothing carried)       right after r: the training step at 1024 under the trainer's own bound, bf16/q8/q4
#                              bases, once the dequantize kernel was off by default again
#   t: carry .gpu2             (a new lease, after `bash .gpu1/mlx-cuda-install.sh 1`) bench/probe_bands.py:
#                              which layer kind of the decoder gives other bits in bands, bf16 and float32
#   q: carry .gpu2             (a new lease, after a) a fresh process's first image at q8/q4 (empty kernel
#                              cache against warm: the warm-up builds the dequantize kernel too); the steps
#                              with the kernel; the training step at 512 (q4 and bf16 bases), two bounds
# Round 9 (qmatmul's compiled dequantize graph; the decode's attention in the same chunks both ways):
#   u: carry .gpu2             (a new lease, after `bash .gpu1/mlx-cuda-install.sh 1`) the steps with each
#                              dequantize; probe_bands and the decode against float32; a fresh process's
#                              first q8/q4 image, empty kernel cache against warm; the layers' products
#   v: carry .gpu2             (a new lease, after `bash .gpu1/mlx-cuda-install.sh 1`) after u's fix: the
#                              first q8/q4 image again; every layer of a decode, whole against banded; the
#                              steps again; the MLX-native load with 8, 12 and 16 threads; the q8 base's
#                              training step at 1024
#   w: carry .gpu2             (a new lease, after `bash .gpu1/mlx-cuda-install.sh 1`) the fused dequantize
#                              for 8 bits only: the steps at the defaults and both paths; the 512x512
#                              level's convolutions in bands (bench/probe_conv_bands.py); the first q4/q8 image
#   x: carry .gpu2             (a new lease, after `bash .gpu1/mlx-cuda-install.sh 1`) the banded convolutions
#                              with their own padding: every layer of a decode; the decode against float32
#   y: carry .gpu2             (a new lease, after `bash .gpu1/mlx-cuda-install.sh 1`) the read probed with
#                              MLX's CPU stream; our bf16 step and the diffusers anchor, eager and compiled
#   z: carry .gpu2             (not run; aa measured its load) the MLX-native load on MLX's CPU stream
#                              against the default, then a first image from the folder each way
# Round 10 (runtime.kernels: the glue around attention on CUDA), each on a new lease after
# `bash .gpu1/mlx-cuda-install.sh 1`, carrying .gpu2:
#   aa: the kernels piece by piece (probe_glue.py) and their tests; the steps with them and with the ops;
#       a profile of the bf16 step; the MLX-native load on each stream (its kernels were then
#       mx.fast.cuda_kernel ones: that code is not kept)
#   ab: the same after the kernels became NVRTC-built cubins; a fresh process's first bf16/q8 image; the
#       bf16 training step at 512 (ab1-* in the results is a run with the older build in a thread)
#   ac: a tiny training step; our bf16 step; the diffusers anchor eager and compiled (target 5)
# Round 11 (the dequantize kernel joins runtime.kernels' cubin), on one lease after
# `bash .gpu1/mlx-cuda-install.sh 1`, carrying .gpu2:
#   ad: the dequantize kernel's tests, values and times; the steps with each dequantize; a fresh
#       process's first q4/q8 image, empty kernel cache against warm
#   ae: (right after ad) probe_image.py; the Hugging Face layout's load + first image, diffusers and
#       mflux, twice each; the native read with the driver's bulk prefetch (probe_load.py)
#   af: (a new lease; carry .gpu2 and .gpuw) the blocks' gradients through each kernel alone; the loader reading on the CPU
#       stream with the driver's prefetch: the native bf16 load each way, a first image from it, and
#       the Hugging Face layout's load + first image (diffusers twice, mflux three times)
# Round 12 (the loader's "cpu-copy": read on the CPU stream, moved, copied into the device's own memory):
#   ag: (a new lease; carry .gpu2 and .gpuw) the native bf16 load each way with a GPU pass over each
#       component after it, a first image from it each way, probe_load's passes over shards read each
#       way (why af's CPU-stream reads computed slower) and its np.asarray check
#   ah: (right after ag, and again right after that) the Hugging Face layout's load + first image:
#       diffusers twice, mflux each way
#   ai: (right after) a native bf16 first image read "cpu-copy", with the overlapped transformer read and
#       without; an empty kernel cache against warm
#   aj: (right after) native q8/q4 loads and first images, each way
#   ak: (a new lease; carry .gpu2 and .gpuw) the loader's group size under "cpu-copy" (probe_groups.py)
#   al: (a new lease; carry .gpu2 and .gpuw) the new defaults: native loads, a native first image, the
#       Hugging Face layout's load + first image against diffusers
#   am: (a new lease; carry .gpu2 and .gpuw) the Hugging Face layout's load + first image against
#       diffusers (round 12 ran it over an experimental loader, not kept)
# .gpu1/.gpu2 come from ../shared/gpu/mlx-cuda-wheels.sh; .gpuw holds wheels downloaded here:
#   pip download --no-deps -d .gpuw mflux==0.24.0 tomli-w piexif platformdirs toml
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpuw peft==0.21.2 accelerate==1.15.0 psutil
# (mflux 0.24.0 is the peer, run by `bench/peer.py all --impls peer`; this round did not run it.)
#
# On a CPU, `bash bench/gpu.sh a|b|c tiny` runs the same benchmarks at tiny size with no installs
# (PY=.venv/bin/python), so that changes are checked here before a device call.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}
SIZE=${2:-full}
PY=${PY:-python3}
LIMIT=${CALL_LIMIT:-530}
mkdir -p "$OUT"
if [ "$SIZE" = full ]; then
  SCRATCH=/var/tmp  # on the machine's disk: each model written here is 34 GB
else
  SCRATCH=${SCRATCH:-/tmp/mflux-gpu-sh}
fi
mkdir -p "$SCRATCH"
HF="$SCRATCH/flux-random"      # the random checkpoint in the Hugging Face layout (written in a)
NATIVE="$SCRATCH/flux-mlx"     # the MLX-native one (written and deleted in c)
PTX="$SCRATCH/mlx-ptx"         # MLX's kernel caches, one per quantization, kept from b to c
BENCH=("$PY" bench/bench_flux.py --size "$SIZE" --tmp "$SCRATCH")

left() { echo $((LIMIT - SECONDS)); }

# install_mflux: MLX's CUDA wheel (second half) and mflux on a full-size run, and tomli_w where .gpuw is
# carried (a kept model's manifest needs it); round 12's cases start with it
install_mflux() {
  if [ "$SIZE" = full ]; then
    bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    if [ -d .gpuw ]; then python3 -m pip install -q --no-index --no-deps --no-cache-dir .gpuw/tomli_w-*.whl; fi
  fi
}

# write_hf: the random checkpoint in the Hugging Face layout, at the run's size, into $HF
write_hf() {
  step write-hf 120 env PYTHONPATH="$PWD" "$PY" bench/peer.py write --folder "$HF" \
    --size "$([ "$SIZE" = full ] && echo full || echo tiny)" 2>&1 | tail -3 | tee "$OUT/write.txt"
}

# hf_turns LIMIT WHO...: diffusers' (full size only) and mflux's load + first image from $HF in the order
# given, mflux's with a warm kernel cache in $PTX/nat and LIMIT seconds each
hf_turns() {
  local limit=$1 who
  shift
  for who in "$@"; do
    if [ "$who" = diffusers ]; then
      if [ "$SIZE" = full ]; then
        step hf-diffusers 30 "$PY" bench/peer.py run --impl diffusers --folder "$HF" 2>&1 | grep '^{' | tee -a "$OUT/hf.jsonl"
      fi
    else
      step hf-mflux 20 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/nat" --folder "$HF" \
        --quant bf16 --time-limit "$limit" 2>&1 | tee -a "$OUT/hf.jsonl"
    fi
  done
}

# step NAME MIN_SECONDS CMD...: run CMD within what is left of the call, or skip it (and say so)
# when less than MIN_SECONDS is left
step() {
  local name=$1 min=$2 l
  shift 2
  l=$(left)
  if [ "$l" -lt "$min" ]; then
    echo "{\"what\": \"skipped\", \"step\": \"$name\", \"why\": \"call time: ${l} s left\"}" | tee -a "$OUT/skipped.jsonl"
    return 0
  fi
  echo "# $name ($l s left in the call)" >&2
  timeout "$l" "$@"
}

# profile NAME MIN_SECONDS ARGS...: bench/profile_gpu.py run ARGS (two untimed calls, then two traced),
# then its analysis, into $OUT/profile.jsonl
profile() {
  local name=$1 min=$2 trace="$SCRATCH/trace-$1.json"
  shift 2
  step "profile-$name" "$min" "$PY" bench/profile_gpu.py run "$@" --calls 2 --trace "$trace" \
    >"$OUT/profile-$name.log" 2>&1
  grep '^{' "$OUT/profile-$name.log" | tee -a "$OUT/profile.jsonl"
  [ -f "$trace" ] && "$PY" bench/profile_gpu.py analyze "$trace" --calls 2 2>&1 | tee -a "$OUT/profile.jsonl"
}

# d and g: the machine described, MLX's CUDA wheel (first half) and tomli-w installed (full size), then the
# random Hugging Face checkpoint written (peer.py imports the repository's test fixtures)
install_first_half_and_write_hf() {
  if [ "$SIZE" = full ]; then
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; } 2>&1 | tee "$OUT/machine.txt"
    bash .gpu1/mlx-cuda-install.sh 1 || exit 1
    python3 -m pip install -q --no-index --no-deps --no-cache-dir .gpuw/tomli_w-*.whl || exit 1
  fi
  rm -rf "$HF"
  step write-hf 120 env PYTHONPATH="$PWD" "$PY" bench/peer.py write --folder "$HF" \
    --size "$([ "$SIZE" = full ] && echo full || echo tiny)" 2>&1 | tail -3 | tee "$OUT/write.txt"
}

# aa and ab: MLX's CUDA wheel (second half) and mflux installed (full size), an empty kernel cache, then
# runtime.kernels piece by piece against MLX's ops (probe_glue.py) and its tests (where pytest is there)
glue_checks() {
  if [ "$SIZE" = full ]; then
    bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  fi
  rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
  step probe-glue 40 timeout 180 "$PY" bench/probe_glue.py --size "$SIZE" 2>&1 | tee "$OUT/probe_glue.jsonl"
  if "$PY" -c "import pytest" 2>/dev/null; then
    step kernel-tests 20 timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/kernel-tests.txt"
  fi
}

HEADROOMS=none,2,1  # the queue bounds swept, GB over what is held (none: MLX's own limit)

case "${1:-}" in
  a)
    if [ "$SIZE" = full ]; then
      { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h / /tmp "$SCRATCH"; free -g; nproc; } \
        2>&1 | tee "$OUT/machine.txt"
      bash .gpu1/mlx-cuda-install.sh 1 || exit 1
      python3 -m pip install -q --no-index --no-deps --no-cache-dir .gpuw/tomli_w-*.whl .gpuw/peft-*.whl \
        .gpuw/accelerate-*.whl .gpuw/psutil-*.whl || exit 1
      [ "${ANCHOR:-1}" = 1 ] && step anchor 200 timeout 300 python3 bench/anchor_diffusers.py ${COMPILE:+--compile} 2>&1 | tee "$OUT/anchor.jsonl"
    fi
    # diffusers + PEFT's training step (the mflux side runs in b, once MLX is installed)
    step train-diffusers 60 "$PY" bench/bench_train.py --size "$SIZE" --impl diffusers --steps 3 --warmup 1 \
      --timeout $(($(left) / 2)) 2>&1 | tee "$OUT/train.jsonl"
    ;;
  b)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX"
    # Target 3: what a fresh process builds and sets up, op class by op class; then the same in a new
    # process on the cache the first one left
    for state in empty warm; do
      step "probe-first-$state" 60 timeout 90 "$PY" bench/probe_first.py --size "$SIZE" --cache "$PTX/all" \
        --state $state 2>&1 | tee -a "$OUT/probe_first.jsonl"
    done
    export MLX_PTX_CACHE_DIR="$PTX/all"
    # Targets 1 and 4: the step at bf16/q8/q4 under each queue bound, each with its peak and the bound
    # the issue states (quantized weights + one dequantized layer + the bf16 step's activations)
    step steps 60 "${BENCH[@]}" --sections step --variants schnell,dev --quant bf16,q8,q4 --paths dequant \
      --headroom "$HEADROOMS" --budget step=130 --time-limit 140 2>&1 | tee "$OUT/steps.jsonl"
    # Issue 15: mflux's LoRA training step (bf16, q8 and q4 bases) at 512 and 1024
    # (a fresh machine's first training step also builds its kernels: 35-50 s)
    step train-mflux 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --steps 3 --warmup 1 \
      --timeout 150 2>&1 | tee -a "$OUT/train.jsonl"
    ;;
  c)
    export MLX_PTX_CACHE_DIR="$PTX/all"
    # firstrun --caches warm reads DIR/<quant>: every quantization's warm cache is b's one
    mkdir -p "$PTX/warm" && for q in bf16 q8 q4; do ln -sfn "$PTX/all" "$PTX/warm/$q"; done
    # Target 4: the pipeline as `mflux run` makes it (T5/CLIP freed before the transformer loads, the
    # transformer before the decode), MLX's peak per phase, at the runtime's own queue bound
    step pipeline 60 "${BENCH[@]}" --sections pipeline --images 2 --quant bf16,q8,q4 --budget pipeline=110 \
      --time-limit 120 2>&1 | tee "$OUT/pipeline.jsonl"
    # Target 3: a fresh process's first image, an empty kernel cache against the warm one
    step firstrun 60 "${BENCH[@]}" --sections firstrun --caches empty --quant bf16 --ptx-cache "$PTX/fresh" \
      --budget firstrun=70 --time-limit 75 2>&1 | tee "$OUT/firstrun.jsonl"
    # Target 2, Hugging Face layout: written, then diffusers and mflux each load it and make two images
    # in a fresh process (warm kernel cache)
    rm -rf "$HF"
    step write-hf 120 env PYTHONPATH="$PWD" "$PY" bench/peer.py write --folder "$HF" --size "$([ "$SIZE" = full ] && echo full || echo tiny)" \
      2>&1 | tail -3 | tee "$OUT/write.txt"
    if [ "$SIZE" = full ]; then
      step hf-diffusers 60 "$PY" bench/peer.py run --impl diffusers --folder "$HF" 2>&1 | grep '^{' | tee "$OUT/hf.jsonl"
    fi
    step hf-mflux 50 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/warm" --folder "$HF" \
      --quant bf16 --time-limit 90 2>&1 | tee -a "$OUT/hf.jsonl"
    rm -rf "$HF"  # the disk holds one 34 GB model at a time
    # Target 2, MLX-native: written, the loader's GB/s, each way of reading the shards, a pipeline
    rm -rf "$NATIVE"
    step native-load 90 "${BENCH[@]}" --sections load --quant bf16 --keep-model "$NATIVE" \
      --time-limit 150 2>&1 | tee "$OUT/native.jsonl"
    step probe-load 40 "$PY" bench/probe_load.py "$NATIVE/bf16/transformer" --threads 8 --timeout 30 \
      2>&1 | tee -a "$OUT/native.jsonl"
    step native-mflux 40 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/warm" \
      --folder "$NATIVE/bf16" --quant bf16 --time-limit 60 2>&1 | tee -a "$OUT/native.jsonl"
    rm -rf "$NATIVE"
    # Target 4: the VAE decode at 1024x1024, whole-tensor and 256 MB bands, under each bound
    step decode 25 "${BENCH[@]}" --sections decode --band-mb 0 --headroom none,2,1 --budget decode=30 \
      --time-limit 35 2>&1 | tee "$OUT/decode.jsonl"
    ;;
  d)
    install_first_half_and_write_hf
    if [ "$SIZE" = full ]; then
      step hf-diffusers 60 "$PY" bench/peer.py run --impl diffusers --folder "$HF" 2>&1 | grep '^{' | tee "$OUT/hf.jsonl"
    fi
    ;;
  e)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX"
    # Target 3 from the Hugging Face folder d wrote: a fresh process, empty cache, warm-up off then on;
    # then a fresh process on the cache the last one left (its marker: no child)
    for w in off on; do
      step "hf-empty-warmup-$w" 50 "${BENCH[@]}" --sections firstrun --caches empty --ptx-cache "$PTX/hf-$w" \
        --folder "$HF" --quant bf16 --kernel-warmup $w --time-limit 80 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    step hf-warm 40 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/hf-on" --folder "$HF" \
      --quant bf16 --time-limit 60 2>&1 | tee -a "$OUT/firstrun.jsonl"
    # the same from random weights built on the GPU (load ~1 s: the warm-up has nothing to hide behind)
    for q in bf16 q8 q4; do
      step "random-empty-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 70 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    step probe-first-empty 40 timeout 60 "$PY" bench/probe_first.py --size "$SIZE" --cache "$PTX/probe" \
      --state empty 2>&1 | tee -a "$OUT/probe_first.jsonl"
    export MLX_PTX_CACHE_DIR="$PTX/train"
    step train-q4-512 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant q4 --res 512 --steps 3 \
      --warmup 1 --timeout $(($(left) - 10)) 2>&1 | tee -a "$OUT/train.jsonl"
    ;;
  f)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX"
    export MLX_PTX_CACHE_DIR="$PTX/all"
    step dequantize 40 "${BENCH[@]}" --sections qmatmul --paths dequant,kernel --budget qmatmul=45 \
      --time-limit 55 2>&1 | tee "$OUT/qmatmul.jsonl"
    step steps 60 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths dequant,kernel \
      --headroom 2 --budget step=95 --time-limit 105 2>&1 | tee "$OUT/steps.jsonl"
    step probe-after-warmup 40 timeout 70 "$PY" bench/probe_first.py --size "$SIZE" --cache "$PTX/probe" \
      --state empty --kernel-warmup 2>&1 | tee "$OUT/probe_first.jsonl"
    rm -rf "$HF"
    step write-hf 60 "$PY" bench/peer.py write --folder "$HF" --size "$([ "$SIZE" = full ] && echo full || echo tiny)" \
      2>&1 | tail -3 | tee "$OUT/write.txt"
    mkdir -p "$PTX/warm" && ln -sfn "$PTX/all" "$PTX/warm/bf16"
    for t in 8 16 8 16; do  # the first run also builds what the steps did not
      step "hf-threads-$t" 25 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/warm" --folder "$HF" \
        --quant bf16 --load-threads $t --time-limit 40 2>&1 | grep '"firstrun"' | tee -a "$OUT/hf-threads.jsonl"
    done
    ;;
  g)
    install_first_half_and_write_hf
    if [ "$SIZE" = full ]; then
      for n in 1 2; do
        step "hf-diffusers-$n" 60 "$PY" bench/peer.py run --impl diffusers --folder "$HF" 2>&1 | grep '^{' | tee -a "$OUT/hf-diffusers.jsonl"
      done
      [ "${ANCHOR:-1}" = 1 ] && step anchor 200 timeout $(($(left) - 5)) python3 bench/anchor_diffusers.py --compile 2>&1 | tee "$OUT/anchor.jsonl"
    fi
    ;;
  h)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX"
    # Targets 2 and 3 from the Hugging Face folder g wrote: a fresh process with an empty kernel cache, then
    # fresh processes on the cache it left, the transformer read while the prompt encodes (auto) and not
    step hf-empty 50 "${BENCH[@]}" --sections firstrun --caches empty --ptx-cache "$PTX/hf" --folder "$HF" \
      --quant bf16 --time-limit 80 2>&1 | tee -a "$OUT/firstrun.jsonl"
    for o in auto auto off off; do
      step "hf-warm-overlap-$o" 30 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/hf" --folder "$HF" \
        --quant bf16 --overlap-load $o --time-limit 45 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    # Target 3 from random weights (nothing to load to hide the warm-up behind), at bf16, q8 and q4
    for q in bf16 q8 q4; do
      step "random-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 70 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    step probe-after-warmup 40 timeout 70 "$PY" bench/probe_first.py --size "$SIZE" --cache "$PTX/probe" \
      --state empty --kernel-warmup 2>&1 | tee "$OUT/probe_first.jsonl"
    export MLX_PTX_CACHE_DIR="$PTX/all"
    # Target 1: the schnell step with each dequantize, at the default bound
    step steps 60 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths dequant \
      --headroom 2 --budget step=95 --time-limit 105 2>&1 | tee "$OUT/steps.jsonl"
    # Target 4: the pipeline as `mflux run` holds it (modulation layers freed), and the decode's bound
    step pipeline 50 "${BENCH[@]}" --sections pipeline --images 2 --quant q8,q4 --budget pipeline=60 \
      --time-limit 70 2>&1 | tee "$OUT/pipeline.jsonl"
    step decode 25 "${BENCH[@]}" --sections decode --band-mb 0 --headroom 2,1,0.5,0.25,0 --budget decode=40 \
      --time-limit 45 2>&1 | tee "$OUT/decode.jsonl"
    ;;
  i)
    rm -rf "$HF" "$NATIVE"  # the disk holds one 34 GB model at a time
    # (run on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` and `.gpu2/... 2`: the kernel cache is new)
    mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    # Target 2, MLX-native: written, read back at GB/s by the loader (8 threads on CUDA), then a pipeline
    step native-load 90 "${BENCH[@]}" --sections load --quant bf16,q4 --keep-model "$NATIVE" \
      --time-limit 240 2>&1 | tee "$OUT/native.jsonl"
    # Target 3 for a stored 4-bit model (6.7 GB to read: little to hide the warm-up behind)
    step native-q4 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/native-q4" \
      --folder "$NATIVE/q4" --quant q4 --time-limit 60 2>&1 | tee -a "$OUT/native.jsonl"
    step native-mflux-empty 40 "${BENCH[@]}" --sections firstrun --caches empty --ptx-cache "$PTX/native" \
      --folder "$NATIVE/bf16" --quant bf16 --time-limit 60 2>&1 | tee -a "$OUT/native.jsonl"
    for n in 1 2; do
      step "native-mflux-$n" 40 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/native" \
        --folder "$NATIVE/bf16" --quant bf16 --time-limit 60 2>&1 | tee -a "$OUT/native.jsonl"
    done
    rm -rf "$NATIVE"
    # Target 4 again, after h: the pipeline with the modulations evaluated under the bound, the overlap
    # for unquantized weights only and nothing holding the transformer through the decode; the decode
    # in row bands (exact), which the bound alone cannot bring under 2 GB
    step pipeline 50 "${BENCH[@]}" --sections pipeline --images 2 --quant bf16,q8,q4 --budget pipeline=70 \
      --time-limit 80 2>&1 | tee "$OUT/pipeline.jsonl"
    step decode-bands 25 "${BENCH[@]}" --sections decode --band-mb 2048,1024,512 --headroom 2 --budget decode=60 \
      --time-limit 65 2>&1 | tee "$OUT/decode.jsonl"
    ;;
  j)
    # after i, on a new lease (after `.gpu1/mlx-cuda-install.sh 1`): the pipeline with the precomputed
    # modulations under the tight bound (memory.TIGHT_HEADROOM)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step pipeline 50 "${BENCH[@]}" --sections pipeline --images 2 --quant bf16,q8,q4 --budget pipeline=70 \
      --time-limit 80 2>&1 | tee "$OUT/pipeline.jsonl"
    ;;
  k)
    # round 6, after `.gpu1/mlx-cuda-install.sh 1` on a new lease: the steps; a fresh process runs
    # uncompiled while the warm-up builds (runtime.warmup); the q8/q4 pipeline with the block-by-block
    # modulations
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX"
    # Target 1: the schnell step, the bias now in the dequantized layers' matmul (qmatmul: mx.addmm)
    MLX_PTX_CACHE_DIR="$PTX/all" step steps 60 "${BENCH[@]}" --sections step --variants schnell \
      --quant bf16,q8,q4 --paths dequant --headroom 2 --budget step=95 --time-limit 105 2>&1 | tee "$OUT/steps.jsonl"
    for q in bf16 q8 q4; do
      step "random-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 70 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    export MLX_PTX_CACHE_DIR="$PTX/rnd/bf16"
    step pipeline 50 "${BENCH[@]}" --sections pipeline --images 2 --quant q8,q4 --budget pipeline=55 \
      --time-limit 65 2>&1 | tee "$OUT/pipeline.jsonl"
    ;;
  l | n)
    # l right after k, n right after m: the steps with qmatmul's own dequantize kernel against
    # mx.dequantize; then kernel profiles (bench/profile_gpu.py, PyTorch's profiler: its CUPTI activity
    # records MLX's kernels too; the device's Nsight Systems cannot import its own captures: libdw is
    # missing), each after two untimed calls; n profiles the q8 and bf16 steps and the banded decode only
    export MLX_PTX_CACHE_DIR="$PTX/all"
    step steps-kernel 60 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 \
      --paths dequant,kernel --headroom 2 --budget step=100 --time-limit 110 2>&1 | tee "$OUT/steps-kernel.jsonl"
    profile step-q8 30 --what step --quant q8 --size "$SIZE"
    profile step-bf16 30 --what step --quant bf16 --size "$SIZE"
    profile decode-bands 30 --what decode --band-mb 1024 --size "$SIZE"
    if [ "$1" = l ]; then
      profile decode-whole 30 --what decode --band-mb 0 --size "$SIZE"
      profile step-q4 30 --what step --quant q4 --size "$SIZE"
    fi
    ;;
  m)
    # round 7, right after `ANCHOR=0 bash bench/gpu.sh a` (diffusers + PEFT's training step) on a new
    # lease: mflux's training step at 1024 (bf16 and the owed q8 base) and a kernel profile of the bf16
    # one, to find the step's 1024² gap (issue 15)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    res=$([ "$SIZE" = full ] && echo 1024 || echo 64)
    profile train-bf16 90 --what train --quant bf16 --res "$res" --size "$SIZE"
    step train-mflux 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant bf16,q8 --res "$res" \
      --steps 3 --warmup 1 --timeout 150 2>&1 | tee -a "$OUT/train.jsonl"
    ;;
  o)
    # a new lease, right after `ANCHOR=0 bash bench/gpu.sh a`: after m and n's fixes (the checkpointed
    # blocks capture pe and the modulations; the banded decode's group sums per channel first)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step decode-bands 25 "${BENCH[@]}" --sections decode --band-mb 1024,512,0 --headroom 2 --budget decode=60 \
      --time-limit 65 2>&1 | tee "$OUT/decode.jsonl"
    step train-mflux 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant bf16 \
      --res "$([ "$SIZE" = full ] && echo 512,1024 || echo 64)" --steps 3 --warmup 1 --timeout 150 2>&1 | tee -a "$OUT/train.jsonl"
    step train-mflux-q 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant q8,q4 \
      --res "$([ "$SIZE" = full ] && echo 1024 || echo 64)" --steps 3 --warmup 1 --timeout 150 2>&1 | tee -a "$OUT/train.jsonl"
    ;;
  p)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    res=$([ "$SIZE" = full ] && echo 1024 || echo 64)
    # the first configuration builds the step's kernels (about 2 minutes on a fresh cache)
    step train-bounds 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant bf16 --res "$res" \
      --headroom train,none,4,8 --steps 4 --warmup 1 --timeout 200 2>&1 | tee -a "$OUT/train.jsonl"
    step train-q8 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant q8 --res "$res" \
      --headroom train,none --steps 3 --warmup 1 --timeout 100 2>&1 | tee -a "$OUT/train.jsonl"
    step decode 25 "${BENCH[@]}" --sections decode --band-mb 1024,512,0 --headroom 2 --budget decode=60 \
      --time-limit 65 2>&1 | tee "$OUT/decode.jsonl"
    ;;
  q)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    # the training step at 512 under the trainer's bound (memory.train_headroom) and under 6 GB (what that
    # bound is on a 32 GB device holding the q4 base): the q4 base (issue 15's memory target), then bf16
    # (the first configuration builds the step's kernels: about 3 minutes on a fresh cache)
    res=$([ "$SIZE" = full ] && echo 512 || echo 64)
    step train-512-q4 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant q4 --res "$res" \
      --headroom train,6 --steps 3 --warmup 1 --timeout 240 2>&1 | tee -a "$OUT/train.jsonl"
    step train-512-bf16 40 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant bf16 --res "$res" \
      --steps 3 --warmup 1 --timeout 60 2>&1 | tee -a "$OUT/train.jsonl"
    for q in q8 q4; do
      step "random-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 70 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    step steps 50 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths kernel \
      --headroom 2 --budget step=70 --time-limit 80 2>&1 | tee "$OUT/steps.jsonl"
    ;;
  r)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX"
    only=t5_q8_one_layer,transformer_q8,t5_one_layer
    for state in empty warm; do
      step "probe-$state" 40 timeout 90 "$PY" bench/probe_first.py --size "$SIZE" --cache "$PTX/probe" \
        --state $state --only $only 2>&1 | tee -a "$OUT/probe_first.jsonl"
    done
    step probe-warmup 40 timeout 90 "$PY" bench/probe_first.py --size "$SIZE" --cache "$PTX/probe-w" \
      --state empty --kernel-warmup --only $only 2>&1 | tee -a "$OUT/probe_first.jsonl"
    find "$PTX" -iname "*custom*" -o -iname "*dequant*" 2>&1 | head -20 | tee "$OUT/kernel-files.txt"
    step random-q8 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
      --quant q8 --time-limit 70 2>&1 | tee -a "$OUT/firstrun.jsonl"
    ;;
  s)
    export MLX_PTX_CACHE_DIR="$PTX/train"
    step train-default 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant bf16,q8,q4 \
      --res "$([ "$SIZE" = full ] && echo 1024 || echo 64)" --headroom train --steps 3 --warmup 1 --timeout 200 \
      2>&1 | tee "$OUT/train-default.jsonl"
    ;;
  t)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    export MLX_PTX_CACHE_DIR="$PTX/all"
    for dt in bfloat16 float32; do
      step "bands-$dt" 20 "$PY" bench/probe_bands.py --size "$SIZE" --band-mb "$([ "$SIZE" = full ] && echo 1024 || echo 0.05)" \
        --dtype $dt 2>&1 | grep '^{' | sed "s/^{/{\"dtype\": \"$dt\", /" | tee -a "$OUT/probe_bands.jsonl"
    done
    ;;
  u)
    # round 9, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1): the schnell steps
    # with mx.dequantize against qmatmul's compiled dequantize graph ("fused", CUDA's default now); the
    # decode's pixels after the attention chunks (probe_bands, bands and whole against float32); a fresh
    # process's first q8/q4 image, the warm-up building the fused graphs; the layers' products each way
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step steps 60 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths dequant,fused \
      --headroom 2 --budget step=130 --time-limit 140 2>&1 | tee "$OUT/steps.jsonl"
    for dt in bfloat16 float32; do
      step "bands-$dt" 20 "$PY" bench/probe_bands.py --size "$SIZE" --band-mb "$([ "$SIZE" = full ] && echo 1024 || echo 0.05)" \
        --dtype $dt 2>&1 | grep '^{' | sed "s/^{/{\"dtype\": \"$dt\", /" | tee -a "$OUT/probe_bands.jsonl"
    done
    step decode 25 "${BENCH[@]}" --sections decode --band-mb "$([ "$SIZE" = full ] && echo 1024 || echo 1),0" \
      --headroom 2 --budget decode=50 --time-limit 55 2>&1 | tee "$OUT/decode.jsonl"
    for q in q8 q4; do
      step "random-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 70 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    step qmatmul 20 "${BENCH[@]}" --sections qmatmul --paths qmm,dequant,fused,kernel --budget qmatmul=50 \
      --time-limit 55 2>&1 | tee "$OUT/qmatmul.jsonl"
    ;;
  v)
    # round 9, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1), after u's fix (the
    # text encoders keep mx.dequantize): a fresh process's first q8/q4 image, empty kernel cache against
    # warm; every layer of a decode, whole against banded; the steps again; the MLX-native load with 8
    # and 16 threads; the training step on a q8 base under the fused dequantize
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" "$NATIVE" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    for q in q8 q4; do
      step "random-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 70 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    step walk 30 "$PY" bench/probe_bands.py --size "$SIZE" --band-mb "$([ "$SIZE" = full ] && echo 1024 || echo 0.05)" \
      --walk 2>&1 | grep '^{' | tee "$OUT/probe_bands.jsonl"
    step steps 50 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths dequant,fused \
      --headroom 2 --budget step=90 --time-limit 100 2>&1 | tee "$OUT/steps.jsonl"
    step native-load 60 "${BENCH[@]}" --sections load --quant bf16 --read-threads 8,16,8,12 --time-limit 150 \
      2>&1 | tee "$OUT/native.jsonl"
    rm -rf "$NATIVE"
    step train-q8 60 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant q8 \
      --res "$([ "$SIZE" = full ] && echo 1024 || echo 64)" --headroom train --steps 3 --warmup 1 \
      --timeout "$(($(left) - 10))" 2>&1 | tee "$OUT/train.jsonl"
    ;;
  w)
    # round 9, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1), once the fused
    # dequantize was kept for 8 bits only: the steps at the defaults (q8 fused, q4 mx.dequantize) and
    # both paths again; the 512x512 level's convolutions in bands of several heights and two paddings;
    # a fresh process's first q4 and q8 image
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step steps 50 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths dequant,fused \
      --headroom 2 --budget step=90 --time-limit 100 2>&1 | tee "$OUT/steps.jsonl"
    n=$([ "$SIZE" = full ] && echo 512 || echo 64)
    for c in "512 512" "512 256"; do
      set -- $c
      step "conv-bands-$1-$2" 15 "$PY" bench/probe_conv_bands.py --size "$n" --cin $1 --cout $2 \
        --rows "$([ "$SIZE" = full ] && echo 146,128,64,256,512 || echo 20,16)" 2>&1 | tee -a "$OUT/conv_bands.jsonl"
    done
    for q in q4 q8; do
      step "random-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 70 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    ;;
  x)
    # round 9, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1), once the banded
    # convolutions take their own padding: every layer of a decode, whole against banded; the decode in
    # 1024 MB bands and whole, each against a float32 decode
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step walk 30 "$PY" bench/probe_bands.py --size "$SIZE" --band-mb "$([ "$SIZE" = full ] && echo 1024 || echo 0.05)" \
      --walk 2>&1 | grep '^{' | tee "$OUT/probe_bands.jsonl"
    step decode 25 "${BENCH[@]}" --sections decode --band-mb "$([ "$SIZE" = full ] && echo 1024,512 || echo 1),0" \
      --headroom 2 --budget decode=50 --time-limit 55 2>&1 | tee "$OUT/decode.jsonl"
    ;;
  y)
    # round 9, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1; it installs diffusers
    # too): target 2's read probed again, MLX's CPU stream among the ways (probe_load.py, 16 GB of shards);
    # our bf16 step, then the diffusers anchor eager and with torch.compile (target 5), in the same lease
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    shards="$SCRATCH/shards"
    rm -rf "$shards"
    step load-probe 40 timeout 150 "$PY" bench/probe_load.py "$shards" --write-gb "$([ "$SIZE" = full ] && echo 16 || echo 0.5)" \
      --ways read_threads,mx_load_threads,mx_load_cpu_threads --threads 8 --timeout 60 2>&1 | tee "$OUT/load_probe.jsonl"
    step load-probe-16 20 timeout 60 "$PY" bench/probe_load.py "$shards" --ways mx_load_cpu_threads,mx_load_threads \
      --threads 16 --timeout 25 2>&1 | tee -a "$OUT/load_probe.jsonl"
    rm -rf "$shards"
    step steps 30 "${BENCH[@]}" --sections step --variants schnell --quant bf16 --headroom 2 --budget step=40 \
      --time-limit 50 2>&1 | tee "$OUT/steps.jsonl"
    if [ "$SIZE" = full ]; then
      step anchor 100 timeout $(($(left) - 5)) python3 bench/anchor_diffusers.py --compile 2>&1 | tee "$OUT/anchor.jsonl"
    fi
    ;;
  z)
    # owed (not run yet), on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1): the
    # MLX-native load on MLX's CPU stream (loader.LOAD_ON_CPU, off by default) against the default, the
    # same folder read both ways; then a pipeline from it each way (its first image shows any page moves
    # the load left to the first step)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" "$NATIVE" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step native-load 60 "${BENCH[@]}" --sections load --quant bf16 --read-threads 8 --keep-model "$NATIVE" \
      --time-limit 150 2>&1 | tee "$OUT/native.jsonl"
    step native-probe 30 "$PY" bench/probe_load.py "$NATIVE/bf16" --ways mx_load_threads,mx_load_cpu_threads \
      --threads 16 --timeout 40 2>&1 | tee -a "$OUT/load_probe.jsonl"
    for how in gpu cpu; do
      step "native-first-$how" 40 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/native" \
        --folder "$NATIVE/bf16" --quant bf16 --load-stream $how --time-limit 60 2>&1 | tee -a "$OUT/native.jsonl"
    done
    rm -rf "$NATIVE"
    ;;
  aa)
    # round 10, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1): target 5's glue
    # kernels (runtime.kernels) piece by piece against MLX's ops, with their builds and differences
    # (probe_glue.py) and their tests; the schnell steps at bf16 and q8 with the kernels and with the ops;
    # a kernel profile of the bf16 step with them; the MLX-native load on the CPU stream (z's first half)
    glue_checks
    step steps 60 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8 --paths fused --glue kernels,ops \
      --headroom 2 --budget step=150 --time-limit 160 2>&1 | tee "$OUT/steps.jsonl"
    profile step-bf16 40 --what step --quant bf16 --size "$SIZE"
    rm -rf "$NATIVE"
    step native-load 60 "${BENCH[@]}" --sections load --quant bf16 --read-threads 8,16 --load-ways gpu,cpu \
      --time-limit 200 2>&1 | tee "$OUT/native.jsonl"
    ;;
  ab)
    # round 10, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1): the kernels
    # compiled by NVRTC into a cubin kept in the kernel cache, run as precompiled kernels with scalar
    # sizes (aa built them with mx.fast.cuda_kernel); their build and pieces (probe_glue.py) and tests;
    # the schnell steps at bf16/q8/q4 with the kernels and with the ops; a kernel profile of the bf16
    # step; a fresh process's first image (empty kernel cache against warm) at bf16 and q8; the bf16
    # LoRA training step at 512 with them
    glue_checks
    step steps 60 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths fused --glue kernels,ops \
      --headroom 2 --budget step=170 --time-limit 180 2>&1 | tee "$OUT/steps.jsonl"
    profile step-bf16 40 --what step --quant bf16 --size "$SIZE"
    for q in bf16 q8; do
      step "random-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 80 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    step train 40 "$PY" bench/bench_train.py --size "$SIZE" --impl mflux --quant bf16 --res "$([ "$SIZE" = full ] && echo 512 || echo 64)" --steps 3 --warmup 1 \
      --timeout 200 2>&1 | tee -a "$OUT/train.jsonl"
    ;;
  ac)
    # round 10, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu2): a tiny LoRA
    # training step (the trainer keeps the kernels out of its compiled step: ab's full-size one gave a NaN
    # loss through them); our bf16 step with the kernels; the diffusers anchor, eager and with
    # torch.compile (target 5), in the same lease
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step train-tiny 20 "$PY" bench/bench_train.py --size tiny --impl mflux --quant bf16 --res 64 --steps 3 --warmup 1 \
      --timeout 60 2>&1 | tee -a "$OUT/train.jsonl"
    step steps 40 "${BENCH[@]}" --sections step --variants schnell --quant bf16 --glue kernels \
      --headroom 2 --budget step=50 --time-limit 60 2>&1 | tee "$OUT/steps.jsonl"
    [ "$SIZE" = full ] && step anchor 100 timeout $(($(left) - 5)) python3 bench/anchor_diffusers.py --compile 2>&1 | tee "$OUT/anchor.jsonl"
    ;;
  ad)
    # round 11, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1): the dequantize
    # kernel in runtime.kernels' cubin (qmatmul "kernel", now CUDA's default); the kernels' probe and tests;
    # each dequantize against mx.dequantize at FLUX's shapes (time, differing values, how MLX rounds); the
    # schnell steps at bf16/q8/q4 with each dequantize; a fresh process's first q4 and q8 image, empty
    # kernel cache against warm (the cache left in $PTX/all is ae's warm one)
    glue_checks
    step qmatmul 40 "${BENCH[@]}" --sections qmatmul --paths dequant,fused,kernel --budget qmatmul=60 \
      --time-limit 70 2>&1 | tee "$OUT/qmatmul.jsonl"
    step steps 60 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths dequant,fused,kernel \
      --headroom 2 --budget step=170 --time-limit 180 2>&1 | tee "$OUT/steps.jsonl"
    for q in q4 q8; do
      step "random-$q" 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/rnd" \
        --quant $q --time-limit 80 2>&1 | tee -a "$OUT/firstrun.jsonl"
    done
    ;;
  ae)
    # round 11, right after ad on the same lease (nothing carried): how far the kernels move a whole
    # image (probe_image.py: kernels, ops and float32); target 2's Hugging Face layout, bf16: the random
    # checkpoint written, then diffusers' and mflux's load + first image from it, each twice in fresh
    # processes (mflux on ad's warm kernel cache)
    export MLX_PTX_CACHE_DIR="$PTX/all"
    step probe-image 60 timeout 150 "$PY" bench/probe_image.py --size "$SIZE" 2>&1 | tee "$OUT/probe_image.jsonl"
    mkdir -p "$PTX/warm" && ln -sfn "$PTX/all" "$PTX/warm/bf16"
    rm -rf "$HF"
    step write-hf 120 env PYTHONPATH="$PWD" "$PY" bench/peer.py write --folder "$HF" \
      --size "$([ "$SIZE" = full ] && echo full || echo tiny)" 2>&1 | tail -3 | tee "$OUT/write.txt"
    for i in 1 2; do
      if [ "$SIZE" = full ]; then
        step "hf-diffusers-$i" 50 "$PY" bench/peer.py run --impl diffusers --folder "$HF" 2>&1 | grep '^{' | tee -a "$OUT/hf.jsonl"
      fi
      step "hf-mflux-$i" 40 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/warm" --folder "$HF" \
        --quant bf16 --time-limit 80 2>&1 | tee -a "$OUT/hf.jsonl"
    done
    rm -rf "$HF"
    # target 2's native read: MLX's CPU stream with the driver moving each shard's pages in bulk
    # (probe_load.py mx_load_cpu_prefetch) against the loader's GPU stream and the CPU stream alone
    shards="$SCRATCH/shards"
    rm -rf "$shards"
    step load-probe 40 timeout 150 "$PY" bench/probe_load.py "$shards" --write-gb "$([ "$SIZE" = full ] && echo 16 || echo 0.5)" \
      --ways mx_load_threads,mx_load_cpu_threads,mx_load_cpu_prefetch --threads 16 --timeout 40 2>&1 | tee "$OUT/load_probe.jsonl"
    step load-probe-8 20 timeout 60 "$PY" bench/probe_load.py "$shards" --ways mx_load_cpu_prefetch \
      --threads 8 --timeout 40 2>&1 | tee -a "$OUT/load_probe.jsonl"
    rm -rf "$shards"
    ;;
  af)
    # round 11, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carrying .gpu1): the blocks'
    # gradients through each kernel alone (probe_glue.py --grads-only: ad's double block gave non-finite
    # ones); target 2 with the loader reading on MLX's CPU stream and the driver prefetching
    # (loader.LOAD_ON_CPU, device.prefetch): the MLX-native bf16 model written and read each way with 8
    # and 16 threads, a first image from it (empty kernel cache, then warm); then the Hugging Face layout:
    # diffusers' load + first image twice, mflux's twice with the default and once on the GPU stream.
    # Carry .gpu2 and .gpuw: --keep-model writes a manifest, which needs tomli_w (round 11 ran without it,
    # and its native pipeline run failed)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
      if [ -d .gpuw ]; then python3 -m pip install -q --no-index --no-deps --no-cache-dir .gpuw/tomli_w-*.whl; fi
    fi
    rm -rf "$PTX" "$NATIVE" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step grads 30 timeout 120 "$PY" bench/probe_glue.py --size "$SIZE" --grads-only 2>&1 | tee "$OUT/grads.jsonl"
    step native-load 90 "${BENCH[@]}" --sections load --quant bf16 --read-threads 8,16 --load-ways gpu,cpu \
      --keep-model "$NATIVE" --time-limit 170 2>&1 | tee "$OUT/native.jsonl"
    step native-first 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/nat" \
      --folder "$NATIVE/bf16" --quant bf16 --time-limit 80 2>&1 | tee -a "$OUT/native.jsonl"
    rm -rf "$NATIVE" "$HF"
    step write-hf 100 env PYTHONPATH="$PWD" "$PY" bench/peer.py write --folder "$HF" \
      --size "$([ "$SIZE" = full ] && echo full || echo tiny)" 2>&1 | tail -3 | tee "$OUT/write.txt"
    for how in default gpu default; do
      if [ "$SIZE" = full ] && [ "$how" = default ]; then
        step "hf-diffusers" 50 "$PY" bench/peer.py run --impl diffusers --folder "$HF" 2>&1 | grep '^{' | tee -a "$OUT/hf.jsonl"
      fi
      step "hf-mflux-$how" 30 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/nat" --folder "$HF" \
        --quant bf16 --load-stream $how --time-limit 60 2>&1 | tee -a "$OUT/hf.jsonl"
    done
    rm -rf "$HF"
    ;;
  ag)
    # round 12, on a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carry .gpu2 and .gpuw): why arrays
    # read on the CPU stream computed slower (af's text encoders), and the loader's "cpu-copy". The
    # MLX-native bf16 model written, then read each way (loader.LOAD_STREAM: gpu, cpu, cpu-copy) with 8 and
    # 16 threads, each component's weights then read once more by the GPU (*_pass_s); a first image from
    # it each way (the encodes and steps after such a load), the first with an empty kernel cache; then
    # probe_load.py: passes over 16 GB of shards read each way, copied or re-made, and whether MLX's
    # `np.asarray` moves a device buffer into managed memory
    install_mflux
    rm -rf "$PTX" "$NATIVE" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step native-load 100 "${BENCH[@]}" --sections load --quant bf16 --read-threads 8,16 --load-ways gpu,cpu,cpu-copy \
      --keep-model "$NATIVE" --time-limit 200 2>&1 | tee "$OUT/native.jsonl"
    for how in gpu cpu cpu-copy gpu; do
      caches=warm
      if [ ! -d "$PTX/nat" ]; then caches=empty,warm; fi
      step "native-first-$how" 40 "${BENCH[@]}" --sections firstrun --caches "$caches" --ptx-cache "$PTX/nat" \
        --folder "$NATIVE/bf16" --quant bf16 --load-stream "$how" --time-limit 80 2>&1 | tee -a "$OUT/native.jsonl"
    done
    rm -rf "$NATIVE"
    shards="$SCRATCH/shards"
    rm -rf "$shards"
    step load-probe 40 timeout 220 "$PY" bench/probe_load.py "$shards" --write-gb "$([ "$SIZE" = full ] && echo 16 || echo 0.5)" \
      --ways asarray,mx_load_threads,mx_load_cpu_prefetch,mx_load_cpu_prefetch_copy,mx_load_cpu_prefetch_detached \
      --threads 16 --timeout 45 2>&1 | tee "$OUT/load_probe.jsonl"
    rm -rf "$shards"
    ;;
  ah)
    # round 12, right after ag on the same lease (nothing carried): target 2's Hugging Face layout, bf16:
    # the random checkpoint written, then diffusers' load + first image, mflux's with the text encoders
    # read each way (loader.LOAD_STREAM: gpu, cpu, cpu-copy), diffusers' again, on ag's warm kernel cache
    export MLX_PTX_CACHE_DIR="$PTX/all"
    rm -rf "$HF"
    write_hf
    for how in diffusers gpu cpu-copy cpu diffusers gpu cpu-copy; do
      if [ "$how" = diffusers ]; then
        if [ "$SIZE" = full ]; then
          step hf-diffusers 50 "$PY" bench/peer.py run --impl diffusers --folder "$HF" 2>&1 | grep '^{' | tee -a "$OUT/hf.jsonl"
        fi
        continue
      fi
      step "hf-mflux-$how" 30 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/nat" --folder "$HF" \
        --quant bf16 --load-stream "$how" --time-limit 60 2>&1 | tee -a "$OUT/hf.jsonl"
    done
    rm -rf "$HF"
    ;;
  ai)
    # round 12, right after ah (nothing carried): a native bf16 first image read "cpu-copy", the
    # transformer read while the prompt encodes and not (--overlap-load auto/off, twice each), then with
    # an empty kernel cache against warm (target 3)
    export MLX_PTX_CACHE_DIR="$PTX/all"
    rm -rf "$NATIVE"
    step native-write 60 "${BENCH[@]}" --sections load --quant bf16 --read-threads 8 --load-ways cpu-copy \
      --keep-model "$NATIVE" --time-limit 150 2>&1 | grep '"load"' | tee "$OUT/overlap.jsonl"
    for o in auto off auto off; do
      step "native-first-$o" 20 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/nat" \
        --folder "$NATIVE/bf16" --quant bf16 --load-stream cpu-copy --overlap-load $o --time-limit 60 2>&1 \
        | grep '"firstrun"' | tee -a "$OUT/overlap.jsonl"
    done
    rm -rf "$SCRATCH/ptx-empty"
    step native-first-empty 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$SCRATCH/ptx-empty" \
      --folder "$NATIVE/bf16" --quant bf16 --load-stream cpu-copy --time-limit 120 2>&1 | grep '"firstrun"' \
      | tee -a "$OUT/overlap.jsonl"
    rm -rf "$NATIVE"
    ;;
  aj)
    # round 12, right after ai (nothing carried): native q8 and q4 models read each way, and first images
    # from them each way, twice (the first of each quantization builds its kernels: an empty cache)
    export MLX_PTX_CACHE_DIR="$PTX/all"
    rm -rf "$NATIVE"
    step native-load 60 "${BENCH[@]}" --sections load --quant q8,q4 --read-threads 8 --load-ways gpu,cpu-copy \
      --keep-model "$NATIVE" --time-limit 200 2>&1 | grep '"load"' | tee "$OUT/quant.jsonl"
    for q in q8 q4; do
      for w in gpu cpu-copy gpu cpu-copy; do
        step "native-first-$q-$w" 20 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX/nat-$q" \
          --folder "$NATIVE/$q" --quant $q --load-stream $w --time-limit 60 2>&1 | grep '"firstrun"' \
          | sed "s/^/$w /" | tee -a "$OUT/quant.jsonl"
      done
    done
    rm -rf "$NATIVE"
    ;;
  ak)
    # round 12, a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carry .gpu2 and .gpuw): the loader's
    # group size under "cpu-copy" (bench/probe_groups.py), q4 and bf16 native models
    install_mflux
    rm -rf "$NATIVE"
    step native-write 60 "${BENCH[@]}" --sections load --quant q4,bf16 --read-threads 8 --load-ways gpu \
      --keep-model "$NATIVE" --time-limit 200 2>&1 | grep '"load"' | tee "$OUT/groups.jsonl"
    for q in q4 bf16; do
      step "groups-$q" 30 "$PY" bench/probe_groups.py "$NATIVE/$q" --mib 16,64,256 | sed "s/^/$q /" | tee -a "$OUT/groups.jsonl"
    done
    rm -rf "$NATIVE"
    ;;
  al)
    # round 12, a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carry .gpu2 and .gpuw): the defaults
    # after ag-ak (loader.LOAD_STREAM "cpu-copy" on CUDA, for components of CPU_READ_MIN_BYTES and up):
    # native bf16/q8/q4 loads, a native bf16 first image (empty kernel cache, then warm), then the Hugging
    # Face layout's load + first image, diffusers and mflux in turn, twice each
    install_mflux
    rm -rf "$PTX" "$NATIVE" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    step native-load 100 "${BENCH[@]}" --sections load --quant bf16,q8,q4 --read-threads 8 --keep-model "$NATIVE" \
      --time-limit 200 2>&1 | tee "$OUT/native.jsonl"
    step native-first 40 "${BENCH[@]}" --sections firstrun --caches empty,warm --ptx-cache "$PTX/nat" \
      --folder "$NATIVE/bf16" --quant bf16 --time-limit 100 2>&1 | tee -a "$OUT/native.jsonl"
    rm -rf "$NATIVE" "$HF"
    write_hf
    hf_turns 60 diffusers mflux diffusers mflux
    rm -rf "$HF"
    ;;
  am)
    # round 12, a new lease after `bash .gpu1/mlx-cuda-install.sh 1` (carry .gpu2 and .gpuw): the random
    # Hugging Face checkpoint written, then diffusers' load + first image and mflux's in turn (mflux's
    # first builds its kernels into an empty cache; the others are warm). Round 12 ran it over a loader
    # that also read the HF transformer on the CPU stream, q/k/v joined there (not kept: its runs timed
    # out, docs/PERFORMANCE.md); over today's loader it times the defaults
    install_mflux
    rm -rf "$PTX" "$HF" && mkdir -p "$PTX" && export MLX_PTX_CACHE_DIR="$PTX/all"
    write_hf
    step hf-mflux-empty 25 "${BENCH[@]}" --sections firstrun --caches empty --ptx-cache "$PTX/nat" --folder "$HF" \
      --quant bf16 --time-limit 60 2>&1 | tee -a "$OUT/hf.jsonl"
    hf_turns 40 diffusers mflux diffusers mflux diffusers mflux
    rm -rf "$HF"
    ;;
  *)
    echo "usage: $0 a|b|c|d|e|f|g|h|i|j|k|l|m|n|o|p|q|r|s|t|u|v|w|x|y|z|aa|ab|ac|ad|ae|af|ag|ah|ai|aj|ak|al|am [full|tiny]" >&2
    exit 2
    ;;
esac
