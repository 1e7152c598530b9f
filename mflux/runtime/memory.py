"""How far ahead of the GPU MLX may run: a bound on the memory one evaluation holds.

MLX evaluates a graph by walking it on the host and encoding each kernel, allocating the kernel's output
as it goes; a buffer goes back to the allocator only once the GPU has finished the kernels that read it.
On CUDA the host encodes a 12B-transformer step (about 2,000 kernels) much faster than the GPU runs
it, and MLX lets up to 10 committed batches of 20 kernels wait (its MAX_ACTIVE_TASKS and
MLX_MAX_OPS_PER_BUFFER). So the step's intermediate buffers pile up ahead of the GPU: on the H200 a
bf16 step at 1024x1024 peaked 9.1 GB over its weights, and a whole-tensor VAE decode 18.6 GB, though
one transformer block needs about 0.5 GB at a time (issue 12, `bench/results/h200-round2/`).

MLX's own back-pressure is the memory limit: while active memory is above `mx.set_memory_limit`, `eval`
stops encoding and waits for queued work to finish. `bounded()` sets that limit to what is held when
the evaluation starts plus a headroom, for that evaluation only, and puts the old limit back. The GPU
still has the headroom's worth of queued work, so it is not starved, and the results are the same
arrays: only when the host waits changes.

The headroom is per backend (`HEADROOM`, bytes; None leaves MLX's limit alone):
- CUDA: 2 GB, from the H200 sweep (`bench_flux.py --sections step --headroom none,2,1`, round 3 in
  docs/PERFORMANCE.md). A schnell step at 1024x1024: bf16 0.160 s and 32.9 GB unbounded, 0.161 s and
  26.1 GB at 2 GB, 0.167 s and 25.0 GB at 1 GB; q4 0.188 s and 19.8 GB, 0.184 s and 9.0 GB, 0.215 s and
  8.2 GB. The whole-tensor VAE decode: 18.4 GB over its weights unbounded, 3.8 GB at 2 GB, no slower
  than 0.006 s. Below 2 GB the GPU starts to wait for the host.
- Metal: unchanged. Metal queues the same way, but no Mac was available to measure what a bound costs.
- CPU: unchanged. The CPU backend runs each kernel as it is encoded; a mid-size step held 17 MB over
  its weights here with or without a bound.
"""

from contextlib import contextmanager

import mlx.core as mx

from mflux.runtime.device import backend

GB = 1 << 30
HEADROOM = {"cuda": 2 * GB, "metal": None, "cpu": None}
# For evaluations that are little work over many weights: the precomputed modulations read 3.2B
# parameters for a few rows, each layer dequantized on CUDA (qmatmul.MIN_ROWS), so under the 2 GB bound
# a q4 model's peaked 2.7 GB over its weights, the pipeline's highest phase (h200 round 5,
# `bench/results/h200-round5/i-pipeline.jsonl`). The GPU waiting for the host costs little there: the
# whole phase takes 0.05-0.1 s.
TIGHT_HEADROOM = {"cuda": GB // 4, "metal": None, "cpu": None}


# For a training step (mflux.train), the share of the device memory not held on entry, at least
# HEADROOM. A checkpointed training step needs far more than a denoising step between the waits: on the
# H200 the bf16 step at 1024x1024 took 0.785 s at 2 GB, 0.719 s at 4 GB, 0.639 s at 8 GB and 0.594 s
# unbounded (12.4 GB over its weights), where diffusers + PEFT took 0.768 s (docs/PERFORMANCE.md, round
# 8). A quarter leaves a large GPU unbounded in effect, and a small one its bound.
TRAIN_SHARE = {"cuda": 0.25, "metal": None, "cpu": None}


def default_headroom() -> int | None:
    return HEADROOM[backend()]


def train_headroom() -> int | None:
    """`TRAIN_SHARE` of the device memory that is not held now, at least `HEADROOM`."""
    share = TRAIN_SHARE[backend()]
    if share is None:
        return None
    return max(default_headroom() or 0, int((device_memory() - mx.get_active_memory()) * share))


def device_memory() -> int:
    """The device's memory: the GPU's where MLX reports it, else the machine's."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextmanager
def bounded(headroom: int | None | str = "auto"):
    """Within the block, MLX's eval waits for queued GPU work whenever more than `headroom` bytes are
    held beyond what was held on entry. "auto" is the backend's `HEADROOM`, "tight" its
    `TIGHT_HEADROOM`, "train" `train_headroom()`; None sets no bound."""
    if headroom == "auto":
        headroom = default_headroom()
    elif headroom == "tight":
        headroom = TIGHT_HEADROOM[backend()]
    elif headroom == "train":
        headroom = train_headroom()
    if headroom is None:
        yield
        return
    old = mx.set_memory_limit(mx.get_active_memory() + int(headroom))
    try:
        yield
    finally:
        mx.set_memory_limit(old)


def evaluate(*arrays, headroom: int | None | str = "auto") -> None:
    """`mx.eval(*arrays)` within `bounded(headroom)`."""
    with bounded(headroom):
        mx.eval(*arrays)
