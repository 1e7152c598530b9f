"""The FLUX.1 transformer: its sizes and the network, in Black Forest Labs' parameter names."""

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from mflux.errors import MfluxError
from mflux.layers import (
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    rope,
    timestep_embedding,
)

# The released models' rope split of a 128-wide head: one axis (unused, zero) and two image axes.
REAL_AXES_DIM = (16, 56, 56)


@dataclass
class FluxParams:
    in_channels: int
    hidden_size: int
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    context_in_dim: int
    vec_in_dim: int
    guidance_embed: bool
    theta: int = 10000
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    def __post_init__(self):
        self.axes_dim = tuple(int(d) for d in self.axes_dim)
        head_dim = self.hidden_size // self.num_heads
        if head_dim * self.num_heads != self.hidden_size:
            raise MfluxError(f"hidden size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        if sum(self.axes_dim) != head_dim or any(d % 2 for d in self.axes_dim):
            raise MfluxError(
                f"rope axes {self.axes_dim} must be even and sum to the head width {head_dim} "
                "(check axes_dims_rope in the transformer's config.json)"
            )

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "FluxParams":
        """Sizes from a diffusers transformer/config.json; missing keys take diffusers' defaults."""
        in_channels = int(d.get("in_channels", 64))
        if d.get("patch_size", 1) != 1 or d.get("out_channels") not in (None, in_channels):
            raise MfluxError(
                f"transformer config has patch_size {d.get('patch_size')} and out_channels "
                f"{d.get('out_channels')}: only FLUX.1 schnell/dev layouts (1, in_channels) are supported"
            )
        heads = int(d.get("num_attention_heads", 24))
        return cls(
            in_channels=in_channels,
            hidden_size=heads * int(d.get("attention_head_dim", 128)),
            num_heads=heads,
            depth=int(d.get("num_layers", 19)),
            depth_single_blocks=int(d.get("num_single_layers", 38)),
            axes_dim=tuple(d.get("axes_dims_rope", REAL_AXES_DIM)),
            context_in_dim=int(d.get("joint_attention_dim", 4096)),
            vec_in_dim=int(d.get("pooled_projection_dim", 768)),
            guidance_embed=bool(d.get("guidance_embeds", False)),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FluxParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "FluxParams":
        """Sizes from the shapes of Black Forest Labs-named tensors (a single-file checkpoint).

        Every size shows in some tensor except the rope split of a head, which no weight carries:
        it is the released (16, 56, 56) scaled to the head width, each image axis getting 56/128 of
        it rounded to an even count and the first axis the rest. Heads of 128, 64 and 32 give
        (16, 56, 56), (8, 28, 28) and (4, 14, 14).
        """
        try:
            hidden, in_channels = shapes["img_in.weight"]
            head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
            return cls(
                in_channels=in_channels,
                hidden_size=hidden,
                num_heads=hidden // head_dim,
                depth=count_blocks(shapes, "double_blocks"),
                depth_single_blocks=count_blocks(shapes, "single_blocks"),
                axes_dim=_scaled_axes(head_dim),
                context_in_dim=shapes["txt_in.weight"][1],
                vec_in_dim=shapes["vector_in.in_layer.weight"][1],
                guidance_embed="guidance_in.in_layer.weight" in shapes,
                mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
                qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            )
        except KeyError as e:
            raise MfluxError(f"not a FLUX.1 transformer checkpoint: no tensor {e.args[0]}") from None


def count_blocks(names: Iterable[str], prefix: str) -> int:
    found = {int(m.group(1)) for k in names if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _scaled_axes(head_dim: int) -> tuple[int, int, int]:
    image_axis = 2 * round(head_dim * REAL_AXES_DIM[1] / sum(REAL_AXES_DIM) / 2)
    first = head_dim - 2 * image_axis
    if first <= 0 or first % 2:
        raise MfluxError(f"cannot split a head of width {head_dim} into three even rope axes")
    return first, image_axis, image_axis


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        p = params
        self.img_in = nn.Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        if p.guidance_embed:
            self.guidance_in = MLPEmbedder(256, p.hidden_size)
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = [
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth)
        ]
        self.single_blocks = [
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)
        ]
        self.final_layer = LastLayer(p.hidden_size, p.in_channels)

    @property
    def dtype(self) -> mx.Dtype:
        # A quantized layer's weight is packed integers; its scales carry the compute dtype.
        return getattr(self.txt_in, "scales", self.txt_in.weight).dtype

    def conditioning(self, timesteps: mx.array, y: mx.array, guidance: mx.array | None = None) -> mx.array:
        """vec (B, hidden): the time, pooled-text and guidance conditioning every block modulates with."""
        vec = self.time_in(self._embed(timesteps))
        if self.params.guidance_embed:
            if guidance is None:
                raise MfluxError("this FLUX.1 model is guidance-distilled (dev): pass a guidance scale")
            vec = vec + self.guidance_in(self._embed(guidance))
        return vec + self.vector_in(y.astype(self.dtype))

    def _embed(self, t: mx.array) -> mx.array:
        # The reference rounds sigma to the model dtype and scales it there before the float32
        # sinusoids; doing the same keeps bfloat16 runs equal to it.
        dtype = self.dtype
        return timestep_embedding(t.astype(dtype) * 1000).astype(dtype)

    def __call__(
        self,
        img: mx.array,
        img_ids: mx.array,
        txt: mx.array,
        txt_ids: mx.array,
        timesteps: mx.array,
        y: mx.array,
        guidance: mx.array | None = None,
    ) -> mx.array:
        dtype = self.dtype
        vec = self.conditioning(timesteps, y, guidance)  # (B, hidden)
        img = self.img_in(img.astype(dtype))  # (B, L, hidden)
        txt = self.txt_in(txt.astype(dtype))  # (B, S, hidden)
        pe = rope(mx.concatenate([txt_ids, img_ids], axis=1), self.params.axes_dim, self.params.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = mx.concatenate([txt, img], axis=1)  # (B, S+L, hidden)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)  # (B, L, in_channels)
