"""The operations T5 and CLIP share that the CUDA tuning replaces (`cuda.jitfree`: no kernels built at
run time); elsewhere MLX's own."""

import mlx.core as mx
import mlx.nn as nn

from mflux.runtime import device


def embed(layer: nn.Module, ids: mx.array) -> mx.array:
    """`layer(ids)` for an `nn.Embedding` or `nn.QuantizedEmbedding`."""
    cuda = device.cuda()
    return cuda.jitfree.embed(layer, ids) if cuda else layer(ids)


def pick(x: mx.array, positions: mx.array) -> mx.array:
    """Row positions[b] of each x[b], for x (B, L, D) -> (B, D)."""
    cuda = device.cuda()
    return cuda.jitfree.pick(x, positions) if cuda else x[mx.arange(x.shape[0]), positions]


def gelu_approx(x: mx.array) -> mx.array:
    """The tanh-approximate GELU."""
    cuda = device.cuda()
    return cuda.jitfree.gelu_approx(x) if cuda else nn.gelu_approx(x)
