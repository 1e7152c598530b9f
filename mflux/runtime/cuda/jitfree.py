"""The text encoders without the kernels MLX's CUDA backend builds at run time.

MLX builds every `mx.compile`d graph (its own `nn.gelu_approx` among them) and every gather
(`table[ids]`) with NVRTC on a process's first use, unless its kernel cache holds them: a fresh process
spent about 20 s building T5's and CLIP's. The encoders run first, before the warm-up's children
(`warmup`) could build anything, so here:
- a lookup `table[ids]` is a one-hot matrix times the table, exact for bf16 and fp16 tables (each output
  is 1 * x plus zeros, accumulated in float32); float32 tables keep the gather, since a float32 matmul
  may round through TF32;
- the tanh-approximate GELU is MLX's formula in plain ops, uncompiled.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from mflux.runtime.cuda import tuning

_EXACT_ONE_HOT = (mx.bfloat16, mx.float16)


def avoid_jit() -> bool:
    return tuning().avoid_jit


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
