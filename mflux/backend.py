import platform

from mflux.errors import MfluxError

# Not `pip install 'mflux[cpu]'`: on PyPI that name is another project.
BACKEND_HINT = (
    "MLX has no backend in this environment; on Linux install one: pip install 'mlx[cpu]' "
    "(or 'mlx[cuda13]' for NVIDIA GPUs; never both)"
)


def import_mlx():
    """mlx.core, or an MfluxError with the install hint when no backend is present."""
    try:
        import mlx.core as mx

        mx.default_device()
    except (ImportError, OSError, RuntimeError) as e:
        if platform.system() == "Darwin":
            raise MfluxError(f"cannot load MLX ({e}); reinstall it: pip install -U mlx") from None
        raise MfluxError(BACKEND_HINT) from None
    return mx


def default_precision() -> str:
    """bfloat16 on a GPU (Metal or CUDA); float32 on MLX's CPU backend, whose bf16 matmul is slow."""
    mx = import_mlx()
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"
