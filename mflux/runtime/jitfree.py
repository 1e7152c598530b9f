"""The text encoders' lookups and activation without kernels that MLX builds at run time (issue 12, target 3).

MLX's CUDA backend ships most kernels prebuilt, but builds some with NVRTC on first use in a process
that finds no copy in its kernel cache (MLX_PTX_CACHE_DIR, see `mflux.backend.kernel_cache_dir`):
every `mx.compile`d graph (MLX's own `nn.gelu_approx` and `nn.silu` are compiled), and every gather,
`table[ids]`, one module per (dtype, index dtype, number of index arrays). On the H200 a fresh process
spent 16.5 s building T5's two modules (the embedding gather and the gelu) and 3.2 s building CLIP's
pooling gather (`bench/probe_first.py`, round 3 in docs/PERFORMANCE.md). The encoders run first, before
anything could build those kernels in the background (`mflux.runtime.warmup`), so on CUDA they avoid them:

- a lookup `table[ids]` is a one-hot matrix times the table. With bf16 or fp16 tables that is exact: each
  output is 1 * x plus zeros, accumulated in float32. Float32 tables keep the gather, since a float32
  matmul may round through TF32 on NVIDIA GPUs;
- the tanh-approximate gelu is written out in plain ops, MLX's own formula uncompiled;
- `a[i]` with an int i is a gather in MLX too, so `item` takes one entry along the first axis as a
  slice, a view. This one holds on every backend: the transformer's steps used it, and the first step of
  a fresh process spent about 4 s building that gather (round 5 in docs/PERFORMANCE.md).

The encoders run once per prompt, so what this costs (a matmul over the vocabulary; a few more
elementwise passes) is small next to the transformer's steps. `AVOID_JIT` says where it applies:
Metal builds these kernels too, but ships its own library for most; no Mac was measured, so it keeps
the plain ops. The CPU backend compiles `mx.compile`d graphs with the system compiler, not gathers.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from mflux.runtime.device import backend

AVOID_JIT = {"cuda": True, "metal": False, "cpu": False}
_EXACT_ONE_HOT = (mx.bfloat16, mx.float16)


def avoid_jit() -> bool:
    return AVOID_JIT[backend()]


def item(a: mx.array, i: int) -> mx.array:
    """`a[i]` for an int i, as a view: MLX builds `a[i]` as a gather, a kernel CUDA compiles at run time."""
    return a[i : i + 1].squeeze(0)


def one_hot(ids: mx.array, n: int, dtype) -> mx.array:
    """(..., n): 1 at each id, 0 elsewhere."""
    return (ids[..., None] == mx.arange(n, dtype=ids.dtype)).astype(dtype)


def lookup(table: mx.array, ids: mx.array) -> mx.array:
    """`table[ids]` for a 2-D table: rows of it, shaped (*ids.shape, table.shape[1])."""
    if not avoid_jit() or table.dtype not in _EXACT_ONE_HOT:
        return table[ids]
    return one_hot(ids, table.shape[0], table.dtype) @ table


def embed(layer: nn.Module, ids: mx.array) -> mx.array:
    """`layer(ids)` for an `nn.Embedding` or `nn.QuantizedEmbedding`; a quantized table is dequantized
    whole first (one layer's float weights, for the length of the call) when the lookup is a matmul."""
    if not avoid_jit():
        return layer(ids)
    if isinstance(layer, nn.QuantizedEmbedding):
        table = mx.dequantize(
            layer["weight"],
            scales=layer["scales"],
            biases=layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
        return lookup(table, ids) if table.dtype in _EXACT_ONE_HOT else layer(ids)
    return lookup(layer.weight, ids)


def pick(x: mx.array, positions: mx.array) -> mx.array:
    """`x[arange(B), positions]`: row positions[b] of each x[b], for x (B, L, D) -> (B, D)."""
    B, L, _ = x.shape
    if not avoid_jit() or x.dtype not in _EXACT_ONE_HOT:
        return x[mx.arange(B), positions]
    return (one_hot(positions, L, x.dtype)[:, None, :] @ x)[:, 0]


def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_approx(x: mx.array) -> mx.array:
    """MLX's `nn.gelu_approx`, in plain ops where compiled graphs are avoided."""
    return _gelu_tanh(x) if avoid_jit() else nn.gelu_approx(x)
