"""A bulk move of arrays onto the GPU through the CUDA driver (`prefetch`).

MLX's CUDA buffers are managed memory: an array MLX's CPU stream wrote lives in host pages until a GPU
kernel touches it, and that touch moves it page fault by page fault. `prefetch` asks the driver to move
whole arrays at once (`cuMemPrefetchAsync`), on a stream of the calling thread's own: after a 16 GB
read on the CPU stream, 9.4 GB/s in all against 5.2 GB/s by faults on an H200.
"""

import ctypes
import threading

import mlx.core as mx
import numpy as np

from mflux.runtime.cuda import ON


class _Location(ctypes.Structure):  # the driver's CUmemLocation; type 1 is CU_MEM_LOCATION_TYPE_DEVICE
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Driver:
    """The CUDA driver's calls `prefetch` makes, with the primary context of device 0 (MLX's)."""

    def __init__(self):
        cuda = ctypes.CDLL("libcuda.so.1")
        self.ctx, dev = ctypes.c_void_p(), ctypes.c_int()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0):
            raise OSError("the CUDA driver did not answer")
        if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev):
            raise OSError("no CUDA context")
        self.prefetch = cuda.cuMemPrefetchAsync_v2
        self.prefetch.argtypes = [ctypes.c_uint64, ctypes.c_size_t, _Location, ctypes.c_uint, ctypes.c_void_p]
        self.cuda, self.local = cuda, threading.local()

    def stream(self) -> ctypes.c_void_p:
        """This thread's prefetch stream (made current with the context on first use)."""
        if getattr(self.local, "stream", None) is None:
            self.cuda.cuCtxSetCurrent(self.ctx)
            stream = ctypes.c_void_p()
            if self.cuda.cuStreamCreate(ctypes.byref(stream), 1):  # CU_STREAM_NON_BLOCKING
                raise OSError("cuStreamCreate failed")
            self.local.stream = stream
        return self.local.stream


_driver: _Driver | None = None
_driver_failed = False
_lock = threading.Lock()


def _get_driver() -> _Driver | None:
    global _driver, _driver_failed
    with _lock:
        if _driver is None and not _driver_failed:
            try:
                _driver = _Driver()
            except (OSError, AttributeError):  # no driver, or one without cuMemPrefetchAsync_v2
                _driver_failed = True
    return _driver


def prefetch(arrays: list) -> bool:
    """Ask the driver to move each evaluated array's memory onto the GPU now; False (nothing is wrong,
    the arrays are as they were) where that can't be done: off CUDA, or a driver that refuses (a system
    without concurrent managed access). The caller then touches them on the GPU instead."""
    if not ON:
        return False
    driver = _get_driver()
    if driver is None:
        return False
    stream, where = driver.stream(), _Location(1, 0)
    for a in arrays:
        if not a.size:
            continue
        raw = a.view(mx.uint8) if a.dtype == mx.bfloat16 else a  # numpy has no bfloat16; same buffer
        pointer = np.asarray(raw).__array_interface__["data"][0]  # the managed buffer, not a copy
        if driver.prefetch(pointer, a.nbytes, where, 0, stream):
            return False
    return True


def prefetch_wait() -> None:
    """Until this thread's prefetches are done (nothing to wait for where none was made)."""
    driver = _driver
    if driver is not None and getattr(driver.local, "stream", None) is not None:
        driver.cuda.cuStreamSynchronize(driver.local.stream)
