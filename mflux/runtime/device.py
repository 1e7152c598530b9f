"""Which of MLX's backends runs here, and the one door from the portable runtime to its CUDA tuning.

The portable runtime calls `mflux.runtime.cuda` only through `cuda()`, at the few sites that
tests/test_layering.py lists, each a single `if` that runs the CUDA path or the portable one. Deleting
the package leaves a working runtime: `cuda()` is then None everywhere.
"""

import mlx.core as mx

_cuda = None  # the package once looked up (False: not here); tests may set it to run its paths on the CPU


def backend() -> str:
    """ "cpu", "cuda" or "metal": the backend of MLX's default device."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    cuda_module = getattr(mx, "cuda", None)  # a build without CUDA may lack the module
    return "cuda" if cuda_module is not None and cuda_module.is_available() else "metal"


def cuda():
    """`mflux.runtime.cuda` where MLX runs on CUDA and the package imports; None elsewhere."""
    global _cuda
    if _cuda is None:
        _cuda = False
        if backend() == "cuda":
            try:
                from mflux.runtime import cuda as package
            except ImportError:
                package = False
            _cuda = package
    return _cuda or None
