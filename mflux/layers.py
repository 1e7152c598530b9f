"""The FLUX.1 transformer's blocks, in Black Forest Labs' names and fused layouts."""

import math

import mlx.core as mx
import mlx.nn as nn


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of t (already scaled to [0, 1000]), cos half first, in float32."""
    # float32: sin/cos of arguments up to 1000 lose every digit in bfloat16
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]  # (B, half)
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)  # (B, dim)


def rope(ids: mx.array, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[mx.array, mx.array]:
    """cos and sin tables of the rotary embedding for position ids (B, L, n_axes): each (B, 1, L, D/2)."""
    angles = []
    for i, d in enumerate(axes_dim):
        freqs = 1.0 / theta ** (mx.arange(0, d, 2, dtype=mx.float32) / d)  # (d/2,)
        angles.append(ids[..., i : i + 1].astype(mx.float32) * freqs)  # (B, L, d/2)
    angles = mx.concatenate(angles, axis=-1)[:, None]  # (B, 1, L, D/2)
    return mx.cos(angles), mx.sin(angles)


def apply_rope(x: mx.array, pe: tuple[mx.array, mx.array]) -> mx.array:
    # Rotates interleaved pairs (x[2i], x[2i+1]). The float32 tables promote the product: rounding
    # the rotation itself to bfloat16 would blur positions, and the reference keeps it in float32 too.
    cos, sin = pe
    B, H, L, D = x.shape
    x = x.reshape(B, H, L, D // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]  # (B, H, L, D/2)
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(B, H, L, D).astype(x.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, pe: tuple[mx.array, mx.array]) -> mx.array:
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    B, H, L, D = q.shape
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5)  # (B, H, L, D)
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * D)


def split_heads(qkv: mx.array, num_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    B, L, _ = qkv.shape
    qkv = qkv.reshape(B, L, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)  # (3, B, H, L, D)
    return qkv[0], qkv[1], qkv[2]


def layer_norm(x: mx.array) -> mx.array:
    return mx.fast.layer_norm(x, None, None, 1e-6)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return layer_norm(x) * (1 + scale) + shift


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(nn.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        # mx.fast.rms_norm accumulates the mean square in float32 whatever the input dtype
        return mx.fast.rms_norm(x, self.scale, 1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def __call__(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        return self.query_norm(q), self.key_norm(k)


class SelfAttention(nn.Module):
    # Holds the weights only: the double block mixes both streams between qkv and proj.
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)  # (B, H, L, D) each
        q, k = self.norm(q, k)
        return q, k, v


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def __call__(self, vec: mx.array) -> list[mx.array]:
        # shift, scale, gate (then shift, scale, gate of the MLP for a double block), each (B, 1, D)
        return mx.split(self.lin(nn.silu(vec))[:, None, :], self.multiplier, axis=-1)


def _mlp(hidden_size: int, mlp_hidden: int) -> list[nn.Module]:
    return [nn.Linear(hidden_size, mlp_hidden), nn.GELU(approx="tanh"), nn.Linear(mlp_hidden, hidden_size)]


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

    def __call__(
        self, img: mx.array, txt: mx.array, vec: mx.array, pe: tuple[mx.array, mx.array]
    ) -> tuple[mx.array, mx.array]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))
        # one joint attention over text then image tokens, the order of the rope ids
        q = mx.concatenate([txt_q, img_q], axis=2)  # (B, H, S+L, D)
        k = mx.concatenate([txt_k, img_k], axis=2)
        v = mx.concatenate([txt_v, img_v], axis=2)
        attn = attention(q, k, v, pe)  # (B, S+L, hidden)
        S = txt.shape[1]
        txt_attn, img_attn = attn[:, :S], attn[:, S:]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * _run(self.img_mlp, modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * _run(self.txt_mlp, modulate(txt, txt_shift2, txt_scale2))
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
        self.mlp_act = nn.GELU(approx="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def __call__(self, x: mx.array, vec: mx.array, pe: tuple[mx.array, mx.array]) -> mx.array:
        shift, scale, gate = self.modulation(vec)
        h = self.linear1(modulate(x, shift, scale))  # (B, L, 3*hidden + mlp_hidden)
        qkv, mlp = h[..., : 3 * self.hidden_size], h[..., 3 * self.hidden_size :]
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        out = self.linear2(mx.concatenate([attention(q, k, v, pe), self.mlp_act(mlp)], axis=-1))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)]

    def __call__(self, x: mx.array, vec: mx.array) -> mx.array:
        shift, scale = mx.split(_run(self.adaLN_modulation, vec)[:, None, :], 2, axis=-1)  # (B, 1, D)
        return self.linear(modulate(x, shift, scale))
