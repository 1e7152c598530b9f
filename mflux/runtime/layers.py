"""The FLUX.1 transformer's blocks, in Black Forest Labs' names and fused layouts.

Attention runs in (B, L, H, D) memory order, the order of the fused qkv output: v stays a view of
it, q and k come out of their norm and rope in that order, the attention kernel reads all three
through strides and writes its output in the same order, so the heads merge back into (B, L, H*D)
without a copy. The elementwise glue around the matmuls is compiled, so each piece is one pass over
memory. On CUDA the q/k norms with the rope, the double block's joint q/k/v, and the single block's
GELU with its concatenation are each one kernel (`cuda.kernels`), with the same values as the ops
here (`qk_rope_ops`, `_concat_act`), which every other backend runs.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from mflux.runtime import device

EPS = 1e-6


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of t (already scaled to [0, 1000]), cos half first, in float32."""
    # float32: sin/cos of arguments up to 1000 lose every digit in bfloat16
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]  # (B, half)
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)  # (B, dim)


def rope(ids: mx.array, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[mx.array, mx.array]:
    """Rotary tables for position ids (B, L, n_axes), float32, each (B, L, 1, D/2, 2): the pair
    (x0, x1) = (x[2i], x[2i+1]) becomes x0 * a + x1 * b, with a = (cos, sin) and b = (-sin, cos)."""
    angles = []
    for i, d in enumerate(axes_dim):
        freqs = 1.0 / theta ** (mx.arange(0, d, 2, dtype=mx.float32) / d)  # (d/2,)
        angles.append(ids[..., i : i + 1].astype(mx.float32) * freqs)  # (B, L, d/2)
    angles = mx.concatenate(angles, axis=-1)[:, :, None, :, None]  # (B, L, 1, D/2, 1)
    cos, sin = mx.cos(angles), mx.sin(angles)
    return mx.concatenate([cos, sin], axis=-1), mx.concatenate([-sin, cos], axis=-1)


@mx.compile
def _rotate(x0: mx.array, x1: mx.array, a: mx.array, b: mx.array) -> mx.array:
    # one pass: x0 and x1 (..., D/2, 1) broadcast against the tables' last axis, in float32 as the
    # reference computes it, rounded once
    return (x0.astype(mx.float32) * a + x1.astype(mx.float32) * b).astype(x0.dtype)


@mx.custom_function
def _rotate_pairs(x0: mx.array, x1: mx.array, a: mx.array, b: mx.array) -> mx.array:
    return _rotate(x0, x1, a, b)


@_rotate_pairs.vjp
def _rotate_pairs_vjp(primals, cotangent, _output):
    # x0 and x1 broadcast over the pair axis, so autograd's cotangent for each is a sum over an axis of
    # 2; CUDA ran those as row reductions of rows of 2 floats, 1.6 ms each (about 0.49 s of a 1.25 s
    # training step at 1024x1024 on the H200). Written out, it is one elementwise pass. The tables
    # come from integer positions and get no gradient.
    x0, x1, a, b = primals
    c = cotangent.astype(mx.float32)
    c0, c1 = c[..., :1], c[..., 1:]
    d0 = c0 * a[..., :1] + c1 * a[..., 1:]
    d1 = c0 * b[..., :1] + c1 * b[..., 1:]
    return d0.astype(x0.dtype), d1.astype(x1.dtype), mx.zeros_like(a), mx.zeros_like(b)


def rotate(x: mx.array, pe: tuple[mx.array, mx.array]) -> mx.array:
    """Apply the rotary tables to x (B, L, H, D)."""
    B, L, H, D = x.shape
    pairs = x.reshape(B, L, H, D // 2, 2)
    return _rotate_pairs(pairs[..., :1], pairs[..., 1:], *pe).reshape(B, L, H, D)


def apply_rope(x: mx.array, pe: tuple[mx.array, mx.array]) -> mx.array:
    """`rotate` for heads-first x (B, H, L, D)."""
    return rotate(x.transpose(0, 2, 1, 3), pe).transpose(0, 2, 1, 3)


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Attention over (B, L, H, D) views -> (B, L, H*D)."""
    B, L, H, D = q.shape
    # The kernel reads heads-first views through strides and writes its output in q's memory
    # order, so the transpose back and the reshape are free.
    out = mx.fast.scaled_dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=D**-0.5
    )  # (B, H, L, D)
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * D)


def split_heads(qkv: mx.array, num_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    B, L, _ = qkv.shape
    qkv = qkv.reshape(B, L, 3, num_heads, -1)  # a view
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, H, D) each


def qk_rope(streams, num_heads: int, pe: tuple[mx.array, mx.array]):
    """q, k and v (B, sum L, H, D) of one or two streams (qkv, query norm weight, key norm weight)."""
    cuda = device.cuda()
    if cuda:
        return cuda.kernels.qk_rope(streams, num_heads, pe, qk_rope_ops)
    return qk_rope_ops(streams, num_heads, pe)


def qk_rope_ops(streams, num_heads: int, pe: tuple[mx.array, mx.array]):
    """`qk_rope` in MLX's ops: each stream's q and k through their RMSNorm and the rope, the
    streams' q, k and v joined along the sequence."""
    qs, ks, vs, start = [], [], [], 0  # mx.fast.rms_norm sums the squares in float32 at any dtype
    for qkv, wq, wk in streams:
        q, k, v = split_heads(qkv[..., : 3 * num_heads * wq.shape[0]], num_heads)
        part = tuple(t[:, start : start + q.shape[1]] for t in pe)
        qs.append(rotate(mx.fast.rms_norm(q, wq, EPS), part))
        ks.append(rotate(mx.fast.rms_norm(k, wk, EPS), part))
        vs.append(v)
        start += q.shape[1]
    if len(streams) == 1:
        return qs[0], ks[0], vs[0]
    return tuple(mx.concatenate(parts, axis=1) for parts in (qs, ks, vs))  # (B, S+L, H, D)


@mx.compile
def gelu_f32(x: mx.array) -> mx.array:
    """GELU, tanh approximation, in float32 rounded once, as PyTorch computes it and the CUDA kernels
    do: the MLPs' activation where they run. Elsewhere the MLPs keep MLX's `nn.gelu_approx`, which
    rounds each step to the input's dtype."""
    y = x.astype(mx.float32)
    return (0.5 * y * (1 + mx.tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))).astype(x.dtype)


def mlp_act(x: mx.array) -> mx.array:
    cuda = device.cuda()
    return gelu_f32(x) if cuda and cuda.kernels.enabled() else nn.gelu_approx(x)


def gelu_concat(attn: mx.array, h: mx.array, offset: int) -> mx.array:
    """[attn, gelu(h[..., offset:])]: the single block's input to `linear2`."""
    cuda = device.cuda()
    if cuda:
        return cuda.kernels.gelu_concat(attn, h, offset, _concat_act)
    return _concat_act(attn, h[..., offset:])


def _concat_act(attn: mx.array, mlp: mx.array) -> mx.array:
    return mx.concatenate([attn, mlp_act(mlp)], axis=-1)


@mx.compile
def _scale_shift(x: mx.array, scale1: mx.array, shift: mx.array) -> mx.array:
    return x * scale1 + shift


def modulate(x: mx.array, shift: mx.array, scale1: mx.array) -> mx.array:
    """LayerNorm(x) * scale1 + shift, with scale1 = 1 + scale; x (B, L, D), shift and scale1 (B, D)."""
    if x.shape[0] == 1:  # one kernel: the layer norm's own affine takes 1-D weights
        return mx.fast.layer_norm(x, scale1.squeeze(0), shift.squeeze(0), EPS)  # views; [0] is a gather
    return _scale_shift(mx.fast.layer_norm(x, None, None, EPS), scale1[:, None], shift[:, None])


@mx.compile
def _gated(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    return x + gate * y


def gated(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """The residual x + gate * y; gate (B, D)."""
    return _gated(x, gate[:, None], y)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(nn.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """An RMSNorm's weight; `qk_rope` applies it."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.ones((dim,))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def stream(self, qkv: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """A stream of `qk_rope`: the qkv output these norms follow, and their weights."""
        return qkv, self.query_norm.scale, self.key_norm.scale


class SelfAttention(nn.Module):
    # Holds the weights only: the double block mixes both streams between qkv and proj.
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def __call__(self, vec: mx.array) -> mx.array:
        # (B, k, D): shift, 1 + scale, gate (then the MLP's three for a double block)
        return _one_plus_scale(self.lin(nn.silu(vec)).reshape(vec.shape[0], self.multiplier, -1), 3)


def _one_plus_scale(mod: mx.array, period: int) -> mx.array:
    # rows (shift, scale[, gate]) repeat with `period`: adding 1 to each scale once here saves a
    # pass over the activations in every block
    mod[:, 1::period] = mod[:, 1::period] + 1
    return mod


class GELU(nn.Module):
    """The MLPs' activation (`mlp_act`); no weights, so the list's indices stay the checkpoint's."""

    def __call__(self, x: mx.array) -> mx.array:
        return mlp_act(x)


def _mlp(hidden_size: int, mlp_hidden: int) -> list[nn.Module]:
    return [nn.Linear(hidden_size, mlp_hidden), GELU(), nn.Linear(mlp_hidden, hidden_size)]


def _run(layers: list[nn.Module], x: mx.array) -> mx.array:
    for layer in layers:
        x = layer(x)
    return x


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)

    def modulations(self, vec: mx.array) -> mx.array:
        return mx.concatenate([self.img_mod(vec), self.txt_mod(vec)], axis=1)  # (B, 12, D)

    def __call__(
        self, img: mx.array, txt: mx.array, vec: mx.array, pe: tuple[mx.array, mx.array]
    ) -> tuple[mx.array, mx.array]:
        return self.forward(img, txt, self.modulations(vec), pe)

    def forward(
        self, img: mx.array, txt: mx.array, mod: mx.array, pe: tuple[mx.array, mx.array], kv=None
    ) -> tuple[mx.array, mx.array]:
        """mod (B, 12, D) from `modulations`; pe for the text tokens, then the image tokens. `kv`, when
        given, maps this shard's k and v to the whole sequence's (mflux.runtime.parallel)."""
        S = txt.shape[1]
        img_qkv = self.img_attn.qkv(modulate(img, mod[:, 0], mod[:, 1]))
        txt_qkv = self.txt_attn.qkv(modulate(txt, mod[:, 6], mod[:, 7]))
        # one joint attention over text then image tokens, the order of the rope ids
        q, k, v = qk_rope(
            [self.txt_attn.norm.stream(txt_qkv), self.img_attn.norm.stream(img_qkv)],
            self.img_attn.num_heads,
            pe,
        )  # (B, S+L, H, D) each
        if kv is not None:
            k, v = kv(k, v)
        attn = attention(q, k, v)  # (B, S+L, hidden)

        img = gated(img, mod[:, 2], self.img_attn.proj(attn[:, S:]))
        img = gated(img, mod[:, 5], _run(self.img_mlp, modulate(img, mod[:, 3], mod[:, 4])))
        txt = gated(txt, mod[:, 8], self.txt_attn.proj(attn[:, :S]))
        txt = gated(txt, mod[:, 11], _run(self.txt_mlp, modulate(txt, mod[:, 9], mod[:, 10])))
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        mlp_hidden = int(hidden_size * mlp_ratio)
        # q, k, v and the MLP's input in one matmul; attention output and MLP output in another
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + mlp_hidden, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def modulations(self, vec: mx.array) -> mx.array:
        return self.modulation(vec)  # (B, 3, D)

    def __call__(self, x: mx.array, vec: mx.array, pe: tuple[mx.array, mx.array]) -> mx.array:
        return self.forward(x, self.modulations(vec), pe)

    def forward(self, x: mx.array, mod: mx.array, pe: tuple[mx.array, mx.array], kv=None) -> mx.array:
        h = self.linear1(modulate(x, mod[:, 0], mod[:, 1]))  # (B, L, 3*hidden + mlp_hidden)
        q, k, v = qk_rope([self.norm.stream(h)], self.num_heads, pe)
        if kv is not None:
            k, v = kv(k, v)
        out = gelu_concat(attention(q, k, v), h, 3 * self.hidden_size)
        return gated(x, mod[:, 2], self.linear2(out))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)]

    def modulations(self, vec: mx.array) -> mx.array:
        # (B, 2, D): shift, 1 + scale
        return _one_plus_scale(_run(self.adaLN_modulation, vec).reshape(vec.shape[0], 2, -1), 2)

    def __call__(self, x: mx.array, vec: mx.array) -> mx.array:
        return self.forward(x, self.modulations(vec))

    def forward(self, x: mx.array, mod: mx.array) -> mx.array:
        return self.linear(modulate(x, mod[:, 0], mod[:, 1]))
