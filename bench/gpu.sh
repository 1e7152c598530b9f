#!/usr/bin/env bash
# The device calls behind docs/PERFORMANCE.md (issue 12), made back to back on one lent GPU machine
# (each call starts within ~30 s of the last, while the machine, what was installed and what was
# written to its disk stay). Each call stops starting new work after CALL_LIMIT seconds (default 530),
# so it ends within 9 minutes. Results go to $OUT (the device tool's output folder) as JSON lines.
#   a: carry .gpu1 and .gpuw   MLX's CUDA wheel (first half), diffusers, the peer; the diffusers anchor
#                              (eager and torch.compile); then the random Hugging Face checkpoint for c
#   b: carry .gpu2             MLX's CUDA wheel (second half), mflux. The first run on this machine:
#                              per bf16/q8/q4, a fresh process with an empty kernel cache, then one with
#                              the cache it left (load + 2 images, MLX's peak per phase); then the
#                              steps at bf16/q8/q4 with both quantized paths and their peaks
#   c: (nothing carried)       load + first image in a fresh process with a warm cache: the Hugging
#                              Face layout (diffusers, then mflux at bf16/q8/q4), then MLX-native
#                              (written, read at GB/s, then a pipeline); the VAE decode, whole against
#                              row bands; T5 + CLIP with both paths; the quantized matmul sweep (the peer
#                              only if more than 330 s are left after mflux on the HF layout)
# .gpu1/.gpu2 come from ../shared/gpu/mlx-cuda-wheels.sh; .gpuw holds wheels downloaded here:
#   pip download --no-deps -d .gpuw mflux==0.24.0 tomli-w piexif platformdirs toml
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

case "${1:-}" in
  a)
    if [ "$SIZE" = full ]; then
      { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h / /tmp "$SCRATCH"; free -g; nproc; } \
        2>&1 | tee "$OUT/machine.txt"
      bash .gpu1/mlx-cuda-install.sh 1 || exit 1
      python3 -m pip install -q --no-index --no-deps --no-cache-dir .gpuw/tomli_w-*.whl || exit 1
      python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/peer \
        .gpuw/mflux-0.24.0-*.whl .gpuw/piexif-*.whl .gpuw/platformdirs-*.whl .gpuw/toml-*.whl || exit 1
      step anchor 300 timeout 420 python3 bench/anchor_diffusers.py --compile 2>&1 | tee "$OUT/anchor.jsonl"
    fi
    rm -rf "$HF"
    step write-hf 80 "$PY" bench/peer.py write --folder "$HF" --size "$([ "$SIZE" = full ] && echo full || echo tiny)" \
      2>&1 | tail -5 | tee "$OUT/write.txt"
    ;;
  b)
    if [ "$SIZE" = full ]; then
      bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    fi
    rm -rf "$PTX"
    # Target 3 and the pipeline peaks: random full-size weights, so no disk read; each child process
    # loads (builds) T5 + CLIP, encodes, frees them, builds the transformer, denoises two images,
    # frees it, decodes. "empty" starts from an empty MLX_PTX_CACHE_DIR, "warm" from what it left.
    step firstrun 120 "${BENCH[@]}" --sections firstrun --quant bf16,q8,q4 --ptx-cache "$PTX" --budget firstrun=250 \
      --time-limit $(($(left) - 20)) 2>&1 | tee "$OUT/firstrun.jsonl"
    # one cache for the rest of the lease: every quantization's kernels (module names are unique)
    mkdir -p "$PTX/all" && for d in "$PTX"/bf16 "$PTX"/q8 "$PTX"/q4; do [ -d "$d" ] && cp -n "$d"/* "$PTX/all/" 2>/dev/null; done
    export MLX_PTX_CACHE_DIR="$PTX/all"
    # Target 1: the schnell step, bf16 and both quantized paths, each with its peak and the bound
    # (quantized weights + one dequantized layer + the bf16 step's activations). The qmm path builds
    # MLX's quantized matmul kernels on first use (108 s at 8 bits on the H100): its first_s shows it.
    step steps 60 "${BENCH[@]}" --sections step --variants schnell --quant bf16,q8,q4 --paths dequant,qmm \
      --budget step=$(($(left) - 10)) --time-limit $(($(left) - 5)) 2>&1 | tee "$OUT/steps.jsonl"
    ;;
  c)
    export MLX_PTX_CACHE_DIR="$PTX/all"
    if [ ! -f "$HF/model_index.json" ]; then
      rm -rf "$HF"
      step write-hf 200 "$PY" bench/peer.py write --folder "$HF" --size "$([ "$SIZE" = full ] && echo full || echo tiny)" \
        2>&1 | tail -5 | tee "$OUT/write.txt"
    fi
    # Target 2, Hugging Face layout: diffusers (load, first and second image, peak), then mflux in a
    # fresh process with the warm cache from b, at bf16, q8 and q4
    if [ "$SIZE" = full ]; then
      step hf-diffusers 60 "$PY" bench/peer.py run --impl diffusers --folder "$HF" 2>&1 | grep '^{' | tee "$OUT/hf.jsonl"
    fi
    step hf-mflux 60 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX" --folder "$HF" \
      --quant bf16,q8,q4 --time-limit $(($(left) - 200)) 2>&1 | tee -a "$OUT/hf.jsonl"
    if [ "$SIZE" = full ] && [ -d /tmp/peer ]; then
      step hf-peer 330 "$PY" bench/peer.py all --folder "$HF" --peer /tmp/peer --impls peer --quants bf16 \
        --time-limit 100 2>&1 | grep '^{' | tee -a "$OUT/hf.jsonl"
    fi
    rm -rf "$HF"  # the disk holds one 34 GB model at a time
    # Target 2, MLX-native: write, time the loader (GB/s), then load + first image in a fresh process
    rm -rf "$NATIVE"
    step native-load 120 "${BENCH[@]}" --sections load --quant bf16 --keep-model "$NATIVE" \
      --time-limit $(($(left) - 100)) 2>&1 | tee "$OUT/native.jsonl"
    step native-mflux 60 "${BENCH[@]}" --sections firstrun --caches warm --ptx-cache "$PTX" \
      --folder "$NATIVE/bf16" --quant bf16 --time-limit $(($(left) - 80)) 2>&1 | tee -a "$OUT/native.jsonl"
    rm -rf "$NATIVE"
    # Target 4: the VAE decode at 1024x1024, whole-tensor layers against 256 MB row bands (peak over
    # its weights, and the largest pixel difference)
    step decode 30 "${BENCH[@]}" --sections decode --band-mb 0,256,64 --budget decode=55 --time-limit 60 2>&1 | tee "$OUT/decode.jsonl"
    # Target 1 for the text encoders, and where each quantized path wins, layer by layer
    step encode 30 "${BENCH[@]}" --sections encode --quant bf16,q8,q4 --paths dequant,qmm \
      --time-limit $(($(left) - 40)) 2>&1 | tee "$OUT/encode.jsonl"
    step qmatmul 20 "${BENCH[@]}" --sections qmatmul --budget qmatmul=$(($(left) - 10)) \
      --time-limit $(($(left) - 5)) 2>&1 | tee "$OUT/qmatmul.jsonl"
    ;;
  *)
    echo "usage: $0 a|b|c [full|tiny]" >&2
    exit 2
    ;;
esac
