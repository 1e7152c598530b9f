"""Which of MLX's backends runs here: the per-backend tables (`qmatmul.MIN_ROWS`, `kernels.USE`,
`warmup.WARM`, ...) are keyed by it."""

import mlx.core as mx


def backend() -> str:
    """ "cpu", "cuda" or "metal": the backend of MLX's default device."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    cuda = getattr(mx, "cuda", None)  # a build without CUDA may lack the module
    return "cuda" if cuda is not None and cuda.is_available() else "metal"
