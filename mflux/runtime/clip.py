"""The CLIP text encoder (text_encoder), in Hugging Face's CLIPTextModel names and numerics.

FLUX.1 uses only its pooled output, taken at the end-of-text token.
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from mflux.errors import MfluxError
from mflux.runtime import textops


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": nn.gelu, "gelu_pytorch_tanh": textops.gelu_approx}


# The encoder's blocks serve SigLIP's vision tower too (siglip.py): the same names and numerics,
# attending without the causal mask. `config` is either network's.
class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        dims = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dims // self.num_heads) ** -0.5
        self.mask = "causal" if causal else None
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=self.mask)  # (B, H, L, Dh)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise MfluxError(
                f"unsupported hidden_act {config.hidden_act!r} in {type(config).__name__} "
                f"(supported: {', '.join(_ACTIVATIONS)})"
            )
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(config, causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        L = input_ids.shape[1]
        if L > self.position_embedding.weight.shape[0]:
            raise MfluxError(f"CLIP takes at most {self.position_embedding.weight.shape[0]} tokens, got {L}")
        return (
            textops.embed(self.token_embedding, input_ids) + self.position_embedding.weight[:L]
        )  # (B, L, D)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config, causal) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))  # (B, L, D)
        return x, textops.pick(x, self.pool_positions(input_ids))  # (B, L, D), (B, D)

    def pool_positions(self, input_ids: mx.array) -> mx.array:
        # The legacy eos_token_id 2 (the real FLUX.1 config) pools at argmax(ids): end-of-text has the highest id.
        # Otherwise transformers pools at the first eos_token_id. argmax returns the first maximum in both.
        if self.eos_token_id == 2:
            return mx.argmax(input_ids, axis=-1)
        return mx.argmax(input_ids == self.eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
    # it runs before CUDA's warm-up could build a compiled graph: its quantized layers keep MLX's
    # prebuilt dequantize (cuda.qmatmul.use_backend_matmul)
    jit_free = True

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def __call__(self, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        return self.text_model(input_ids)  # (B, L, D), (B, D)
