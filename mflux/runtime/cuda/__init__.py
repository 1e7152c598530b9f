"""CUDA-only tuning of the runtime: everything here works around how MLX's CUDA backend behaves today.

- `kernels`: the transformer's glue around attention as precompiled NVRTC kernels;
- `jitfree`: the text encoders without kernels MLX builds at run time;
- `warmup`: child processes that build the compiled graphs' kernels while weights load;
- `load`: reading a component with several threads, large ones on MLX's CPU stream then copied to the
  device (`driver.prefetch` moves them in bulk); reading the transformer while the prompts encode;
- `memory`: how far MLX's queue may run ahead of the GPU (a headroom per kind of evaluation);
- `qmatmul`: quantized layers that dequantize just before a float matmul.

The portable runtime reaches this package only through `mflux.runtime.device.cuda()`, at the sites
tests/test_layering.py lists. `TUNING` is the one record of choices; `tuned(...)` changes it for a block
(benchmarks, tests). docs/PERFORMANCE.md has the figures behind each default.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

from mflux.runtime.device import backend

GB = 1 << 30


@dataclass(frozen=True)
class Tuning:
    kernels: bool = True  # the glue kernels and the MLPs' float32 GELU (kernels.py)
    avoid_jit: bool = True  # the text encoders' lookups and GELU without run-time kernels (jitfree.py)
    warm: bool = True  # child processes build the compiled graphs' kernels (warmup.py)
    load_threads: int = 8  # threads reading one component
    cpu_read_min_bytes: int | None = 8 * 10**9  # components this large read on the CPU stream; None: never
    overlap_load: bool = True  # read the transformer while the prompts encode, where memory allows
    headroom: int | None = 2 * GB  # a denoising step or a decode (memory.py)
    tight_headroom: int | None = GB // 4  # the precomputed modulations: little work over many weights
    train_share: float | None = 0.25  # a training step: this share of the free memory, at least headroom
    dequantize_min_rows: int | None = 1  # quantized layers dequantize before the matmul from this many rows
    fused_dequantize: bool = True  # 8-bit weights through one compiled graph, else mx.dequantize
    batch_size: int = 4  # images denoised together when the caller does not say


TUNING = Tuning()
ON = backend() == "cuda"


def tuning() -> Tuning:
    """The record in force (the modules here read it at each call, so `tuned` reaches them)."""
    return TUNING


@contextmanager
def tuned(**changes) -> Iterator[Tuning]:
    """`TUNING` with `changes` inside the block (a benchmark's or a test's), restored after."""
    global TUNING
    unknown = set(changes) - {f.name for f in fields(Tuning)}
    if unknown:
        raise TypeError(f"no such tuning: {', '.join(sorted(unknown))}")
    old, TUNING = TUNING, replace(TUNING, **changes)
    try:
        yield TUNING
    finally:
        TUNING = old


def status() -> str:
    """One line: whether this tuning runs here, and the glue kernels' state."""
    if not ON:
        return f"off: MLX runs on {backend()}"
    from mflux.runtime.cuda import kernels

    return f"on; kernels {kernels.status()}"


_MODULES = ("driver", "jitfree", "kernels", "load", "memory", "qmatmul", "warmup")


def __getattr__(name: str):
    """The modules above as attributes, imported on first use (`cuda.kernels.qk_rope(...)`)."""
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
