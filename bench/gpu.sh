#!/usr/bin/env bash
# The three device calls behind docs/PERFORMANCE.md, made back to back on one lent GPU machine
# (each call starts within ~30 s of the last, while the machine and what was installed stay warm).
# Results go to $OUT (the device tool's output folder; any folder works elsewhere).
#   a: carry .gpu1 and .gpuw    MLX's CUDA wheel (first half), diffusers, the peer; the diffusers anchor
#   b: carry .gpu2              MLX's CUDA wheel (second half), mflux; bench_flux.py at full size
#   c: (nothing carried)        peer.py: a random checkpoint in the Hugging Face layout; diffusers,
#                               mflux and the peer on it, each at bf16, 8 and 4 bits
#   train: carry .gpu2 and .gpuw, right after a (or after b, with the MLX install still there):
#                               bench_train.py at full size, 512 then 1024; .gpuw also needs
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpuw peft==0.21.2 accelerate==1.15.0 psutil
# .gpu1/.gpu2 come from ../shared/gpu/mlx-cuda-wheels.sh; .gpuw holds wheels downloaded here:
#   pip download --no-deps -d .gpuw mflux==0.24.0 tomli-w piexif platformdirs toml
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
SCRATCH=/var/tmp  # on the machine's disk: the models written here are up to 34 GB
mkdir -p "$SCRATCH"
case "${1:-}" in
  a)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h / /tmp "$SCRATCH"; free -g; nproc; } \
      2>&1 | tee "$OUT/machine.txt"
    bash .gpu1/mlx-cuda-install.sh 1 || exit 1
    python3 -m pip install -q --no-index --no-deps --no-cache-dir .gpuw/tomli_w-*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/peer \
      .gpuw/mflux-0.24.0-*.whl .gpuw/piexif-*.whl .gpuw/platformdirs-*.whl .gpuw/toml-*.whl || exit 1
    timeout 420 python3 bench/anchor_diffusers.py --compile 2>&1 | tee "$OUT/anchor.jsonl"
    ;;
  b)
    bash .gpu2/mlx-cuda-install.sh 2 && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    # separate processes, so that a failure in one section leaves the others' figures
    python3 bench/bench_flux.py --size full --sections step,levers --budget step=120 --budget levers=45 --time-limit 170 2>&1 | tee "$OUT/mflux.jsonl"
    python3 bench/bench_flux.py --size full --sections micro --time-limit 130 2>&1 | tee -a "$OUT/mflux.jsonl"
    python3 bench/bench_flux.py --size full --sections decode,encode --time-limit 70 2>&1 | tee -a "$OUT/mflux.jsonl"
    python3 bench/bench_flux.py --size full --sections load --quant bf16,q4,q8 --time-limit 100 --tmp "$SCRATCH" \
      2>&1 | tee -a "$OUT/mflux.jsonl"
    ;;
  c)
    python3 bench/peer.py all --folder "$SCRATCH/flux-random" --peer /tmp/peer --time-limit 510 --delete \
      2>&1 | tee "$OUT/peer.jsonl"
    ;;
  train)
    python3 -c "import mlx.core" 2>/dev/null || bash .gpu2/mlx-cuda-install.sh 2 || exit 1
    python3 -m pip install -q --no-index --no-deps --no-cache-dir .gpuw/peft-*.whl .gpuw/accelerate-*.whl \
      .gpuw/psutil-*.whl && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    for res in 512 1024; do
      timeout 280 python3 bench/bench_train.py --size full --res $res --steps 3 --warmup 1 --timeout 130 \
        2>&1 | tee -a "$OUT/train.jsonl"
    done
    ;;
  *)
    echo "usage: $0 a|b|c|train" >&2
    exit 2
    ;;
esac
