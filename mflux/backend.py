import os
import platform
import sys
from pathlib import Path

from mflux.errors import MfluxError

# Not `pip install 'mflux[cpu]'`: on PyPI that name is another project.
BACKEND_HINT = (
    "MLX has no backend in this environment; on Linux install one: pip install 'mlx[cpu]' "
    "(or 'mlx[cuda13]' for NVIDIA GPUs; never both)"
)


def kernel_cache_dir() -> Path:
    """Where MLX's CUDA backend keeps the kernels it builds at run time: MLX_PTX_CACHE_DIR where set, else
    `$XDG_CACHE_HOME/mflux/mlx-<version>/ptx` (`~/.cache/...`), which `import_mlx` sets. MLX's own
    default is in the temporary folder, which many systems clear at boot; each kernel lost is rebuilt
    on the next first run (seconds each). The MLX version is in the path because a new MLX
    may build different code under the same kernel names."""
    if os.environ.get("MLX_PTX_CACHE_DIR"):
        return Path(os.environ["MLX_PTX_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mflux" / f"mlx-{_mlx_version()}" / "ptx"


def _mlx_version() -> str:
    # MLX's own attribute where it is loaded: importlib.metadata costs tens of ms on the way to an image
    mx = sys.modules.get("mlx.core")
    if mx is not None and getattr(mx, "__version__", None):
        return mx.__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx")
    except PackageNotFoundError:
        return "unknown"


def import_mlx():
    """mlx.core, or an MfluxError with the install hint when no backend is present. Sets
    MLX_PTX_CACHE_DIR (`kernel_cache_dir`) where it is unset, before anything runs: MLX reads it once, at
    its first kernel build, not at import."""
    try:
        import mlx.core as mx

        os.environ.setdefault("MLX_PTX_CACHE_DIR", str(kernel_cache_dir()))
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
