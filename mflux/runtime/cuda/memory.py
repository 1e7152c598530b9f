"""How far ahead of the GPU MLX may run: a bound on the memory one evaluation holds.

MLX evaluates a graph by encoding each kernel on the host, allocating its output as it goes; a buffer
goes back to the allocator only once the GPU has finished the kernels that read it. On CUDA the host
encodes a 12B-transformer step much faster than the GPU runs it, so a bf16 step's intermediate
buffers piled up 9.1 GB over its weights (a whole VAE decode 18.6 GB), where a block needs about 0.5 GB.
MLX's own back-pressure is its memory limit: while more is held, `eval` waits for queued work. `bounded`
sets that limit to what is held on entry plus a headroom, for the block only; the results are the same
arrays, only when the host waits changes.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

from mflux.runtime.cuda import tuning
from mflux.runtime.memory import device_memory


def headroom(kind: str | int | None) -> int | None:
    """Bytes for "auto", "tight" or "train" (`Tuning`'s headroom, tight_headroom, train_share); an int
    or None is taken as it is."""
    t = tuning()
    if kind == "auto":
        return t.headroom
    if kind == "tight":
        return t.tight_headroom
    if kind == "train":
        if t.train_share is None:
            return None
        return max(t.headroom or 0, int((device_memory() - mx.get_active_memory()) * t.train_share))
    return kind


@contextmanager
def bounded(kind: str | int | None = "auto") -> Iterator[None]:
    """Within the block, MLX's eval waits for queued GPU work whenever more than `headroom(kind)` bytes
    are held beyond what was held on entry (None: no bound)."""
    room = headroom(kind)
    if room is None:
        yield
        return
    old = mx.set_memory_limit(mx.get_active_memory() + int(room))
    try:
        yield
    finally:
        mx.set_memory_limit(old)
