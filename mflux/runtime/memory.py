"""The device's memory, and evaluations under a bound on what MLX's queue may hold ahead of the GPU.

Every backend evaluates through `evaluate`/`bounded`; on CUDA the bound is the tuning's headroom for that
kind of evaluation (`cuda.memory`), elsewhere there is none.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

from mflux.runtime import device


def device_memory() -> int:
    """The device's memory: the GPU's where MLX reports it, else the machine's."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextmanager
def bounded(headroom: str = "auto") -> Iterator[None]:
    """Evaluations inside wait for queued GPU work whenever the kind's headroom is held beyond what was
    held on entry: "auto" (a step, a decode), "tight" (little work over many weights), "train"."""
    cuda = device.cuda()
    if cuda:
        with cuda.memory.bounded(headroom):
            yield
    else:
        yield


def evaluate(*arrays, headroom: str = "auto") -> None:
    """`mx.eval(*arrays)` within `bounded(headroom)`."""
    with bounded(headroom):
        mx.eval(*arrays)
