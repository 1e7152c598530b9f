"""The T5 encoder (text_encoder_2), in Hugging Face's T5EncoderModel names and numerics.

FLUX.1 feeds it padded ids without an attention mask, so padding tokens are attended. Run it in
float32 or bfloat16 (its dtype follows its weights): float16 overflows in T5's feed-forward activations.
"""

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from mflux.errors import MfluxError
from mflux.runtime import textops


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps the legacy "gated-gelu" to the tanh approximation
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "gelu_new": textops.gelu_approx,
    "gelu_pytorch_tanh": textops.gelu_approx,
    "silu": nn.silu,
}


class T5LayerNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # RMS without mean or bias; the variance in float32, rounded to the weight's dtype before scaling
        x32 = x.astype(mx.float32)
        var = mx.mean(mx.square(x32), axis=-1, keepdims=True)
        return self.weight * (x32 * mx.rsqrt(var + self.eps)).astype(self.weight.dtype)


# Bidirectional T5 buckets: half for each sign; exact below num_buckets/4, log-spaced up to max_distance.
def relative_position_bucket(rel: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    half = num_buckets // 2
    bucket = (rel > 0).astype(mx.int32) * half
    dist = mx.abs(rel)
    max_exact = half // 2
    # float32 log as transformers computes it; max(dist, 1) avoids log(0) in the branch not taken
    scaled = mx.log(mx.maximum(dist, 1).astype(mx.float32) / max_exact) / math.log(max_distance / max_exact)
    large = mx.minimum(max_exact + (scaled * (half - max_exact)).astype(mx.int32), half - 1)
    return bucket + mx.where(dist < max_exact, dist, large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_bias:
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def position_bias(self, length: int) -> mx.array:
        pos = mx.arange(length)
        rel = pos[None, :] - pos[:, None]  # (L, L): key position - query position
        buckets = relative_position_bucket(rel, self.num_buckets, self.max_distance)
        return textops.embed(self.relative_attention_bias, buckets).transpose(2, 0, 1)[None]  # (1, H, L, L)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for p in (self.q, self.k, self.v)
        )
        # T5 does not scale q·k: the scale is folded into its weights
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=1.0, mask=bias.astype(q.dtype)
        )  # (B, H, L, d_kv)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        if config.activation not in _ACTIVATIONS:
            raise MfluxError(
                f"unsupported T5 feed_forward_proj {config.feed_forward_proj!r} "
                f"(supported activations: {', '.join(_ACTIVATIONS)})"
            )
        self.act = _ACTIVATIONS[config.activation]
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_bias), T5LayerFF(config)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = [T5Block(config, has_relative_bias=i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        # block 0 owns the relative position bias; every block reuses it
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])  # (1, H, L, L)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    # it runs before CUDA's warm-up could build a compiled graph: its quantized layers keep MLX's
    # prebuilt dequantize (cuda.qmatmul.use_backend_matmul)
    jit_free = True

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.encoder(textops.embed(self.shared, input_ids))  # (B, L, D)
