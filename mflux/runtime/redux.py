"""FLUX.1 Redux's image embedder (image_embedder), in diffusers' ReduxImageEncoder names, and `Redux`: the
image encoder, its preprocessing and the embedder together, as FluxPriorReduxPipeline.encode_image then
image_embedder run them.

The embedder maps SigLIP's image tokens into T5's width, so they can follow the prompt's T5 tokens.
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from mflux.runtime.siglip import SiglipImageProcessing, SiglipVisionModel, pixel_values


@dataclass
class ReduxConfig:
    redux_dim: int = 1152  # SigLIP's hidden size
    txt_in_features: int = 4096  # T5's

    @classmethod
    def from_dict(cls, d: dict) -> "ReduxConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class ReduxImageEncoder(nn.Module):
    def __init__(self, config: ReduxConfig):
        super().__init__()
        self.config = config
        self.redux_up = nn.Linear(config.redux_dim, config.txt_in_features * 3)
        self.redux_down = nn.Linear(config.txt_in_features * 3, config.txt_in_features)

    def __call__(self, x: mx.array) -> mx.array:
        return self.redux_down(nn.silu(self.redux_up(x)))  # (B, L, txt_in_features)


@dataclass
class Redux:
    """What FLUX.1-Redux-dev's folder holds (`loader.load_redux` reads it)."""

    image_encoder: SiglipVisionModel
    image_embedder: ReduxImageEncoder
    processing: SiglipImageProcessing

    def __call__(self, images: list[Image.Image]) -> mx.array:
        """Each image's tokens in T5's width, (N, L, txt_in_features): SigLIP's 729 at 384 px."""
        pixels = mx.array(
            np.stack([pixel_values(image, self.processing) for image in images])
        )  # (N, H, W, C)
        return self.image_embedder(self.image_encoder(pixels))
