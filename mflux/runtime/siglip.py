"""SigLIP's vision tower (Redux's image_encoder), in Hugging Face's SiglipVisionModel names and numerics,
and its preprocessing, as transformers' SiglipImageProcessorPil does it.

Redux reads only the last hidden state (after the post-layernorm), so the pooling head the checkpoint
also carries (`head.*`) is not built: the converter drops its keys.
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from mflux.errors import MfluxError
from mflux.runtime.clip import CLIPEncoder


@dataclass
class SiglipVisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> "SiglipVisionConfig":
        d = d.get("vision_config", d)  # a whole SiglipConfig holds the tower's under vision_config
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class SiglipImageProcessing:
    """preprocessor_config.json's values: resize to (height, width), rescale, normalise."""

    height: int = 384
    width: int = 384
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dict(cls, d: dict, image_size: int) -> "SiglipImageProcessing":
        # without a size, the tower's own: the only size its position embeddings fit
        size = d.get("size") or {}
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        return cls(
            **{**values, "height": size.get("height", image_size), "width": size.get("width", image_size)}
        )


def pixel_values(image: Image.Image, processing: SiglipImageProcessing) -> np.ndarray:
    """One image as the tower takes it, (H, W, 3) float32, exactly as SiglipImageProcessorPil makes it
    (channels last here, for MLX's convolution)."""
    rgb = _rgb(image).resize((processing.width, processing.height), resample=processing.resample)
    # transformers rescales in float64 and casts to float32 before normalising in float32
    x = (np.asarray(rgb).astype(np.float64) * processing.rescale_factor).astype(np.float32)
    mean = np.asarray(processing.image_mean, dtype=np.float32)
    std = np.asarray(processing.image_std, dtype=np.float32)
    return (x - mean) / std


def _rgb(image: Image.Image) -> Image.Image:
    # transparency is composited onto white, as transformers' convert_to_rgb does
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.image_size = config.image_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        B, H, W, _ = pixels.shape
        if (H, W) != (self.image_size, self.image_size):
            # the learned positions fit one grid; transformers' interpolation is not what Redux uses
            raise MfluxError(f"SigLIP takes {self.image_size}x{self.image_size} images, got {W}x{H}")
        x = self.patch_embedding(pixels)  # (B, H/p, W/p, D): patches in row-major order, as torch's flatten
        return x.reshape(B, -1, x.shape[-1]) + self.position_embedding.weight  # (B, L, D)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = CLIPEncoder(config, causal=False)  # transformers' SiglipEncoder is CLIP's, unmasked
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))  # (B, L, D)


class SiglipVisionModel(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(config)

    def __call__(self, pixels: mx.array) -> mx.array:
        """`last_hidden_state` for pixels (B, H, W, C) as `pixel_values` makes them."""
        return self.vision_model(pixels.astype(self.dtype))  # (B, L, D)

    @property
    def dtype(self) -> mx.Dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype
