"""Flow-matching sampling for FLUX.1: the sigma schedule, the Euler step, and 2x2 latent packing.

The arithmetic follows diffusers' FluxPipeline and FlowMatchEulerDiscreteScheduler float for float, so the
timesteps the transformer sees are the same float32 values.
"""

import math

import mlx.core as mx
import numpy as np

from mflux.errors import InvalidArgument


def sigmas(
    num_steps: int,
    image_seq_len: int,
    shift: bool,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> list[float]:
    """num_steps + 1 sigmas from 1 down to a final 0; `shift` is dev's resolution-dependent shift."""
    if num_steps < 1:
        raise InvalidArgument(f"the number of steps must be at least 1, got {num_steps}")
    # diffusers: linspace in float64, cast to float32, then the shift in float32 with float64 scalars
    s = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if shift:
        m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
        mu = image_seq_len * m + (base_shift - m * base_seq_len)
        e = np.float32(math.exp(mu))
        s = e / (e + (np.float32(1) / s - np.float32(1)))
    return [float(x) for x in s] + [0.0]


def timesteps(sigma_list: list[float]) -> list[float]:
    """The timestep the transformer gets for each sigma, as FluxPipeline computes it in float32.

    diffusers stores t = sigma * 1000 and passes t / 1000, which is not always sigma itself.
    """
    s = np.array(sigma_list[:-1], dtype=np.float32)
    return [float(x) for x in (s * np.float32(1000)) / np.float32(1000)]


def euler_step(x: mx.array, v: mx.array, sigma: float, sigma_next: float) -> mx.array:
    # as diffusers: dt (float32) * v in v's dtype, added to the sample upcast to float32, cast to v's dtype
    dt = mx.array(sigma_next - sigma, dtype=mx.float32).astype(v.dtype)
    return (x.astype(mx.float32) + dt * v).astype(v.dtype)


def pack(z: mx.array) -> mx.array:
    """(B, h, w, C) -> (B, h/2 * w/2, 4C), channels ordered (C, 2, 2) as diffusers packs NCHW."""
    B, h, w, C = z.shape
    z = z.reshape(B, h // 2, 2, w // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)  # (B, h/2, w/2, C, 2, 2)
    return z.reshape(B, (h // 2) * (w // 2), 4 * C)


def unpack(x: mx.array, height: int, width: int) -> mx.array:
    """(B, L, 4C) -> (B, h, w, C) for an image of height x width pixels."""
    B, _, D = x.shape
    h, w = _latent_size(height, width)
    x = x.reshape(B, h // 2, w // 2, D // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)  # (B, h/2, 2, w/2, 2, C)
    return x.reshape(B, h, w, D // 4)


def image_ids(height: int, width: int) -> mx.array:
    """(1, (H/16) * (W/16), 3) position ids (0, row, col) of the packed image tokens."""
    h, w = (n // 2 for n in _latent_size(height, width))
    rows = mx.broadcast_to(mx.arange(h)[:, None], (h, w))
    cols = mx.broadcast_to(mx.arange(w)[None, :], (h, w))
    ids = mx.stack([mx.zeros((h, w), dtype=mx.int32), rows, cols], axis=-1)  # (h, w, 3)
    return ids.reshape(1, h * w, 3).astype(mx.float32)


def text_ids(seq_len: int) -> mx.array:
    return mx.zeros((1, seq_len, 3), dtype=mx.float32)


def noise(seed: int, height: int, width: int, channels: int = 16, dtype=mx.float32) -> mx.array:
    """(1, L, 4 * channels) packed initial latents, drawn as a (1, h, w, channels) map with MLX's RNG."""
    h, w = _latent_size(height, width)
    z = mx.random.normal((1, h, w, channels), key=mx.random.key(seed))
    return pack(z).astype(dtype)


def _latent_size(height: int, width: int) -> tuple[int, int]:
    # 8x VAE compression, then 2x2 packing: FluxPipeline rounds the image down to a multiple of 16
    return 2 * (height // 16), 2 * (width // 16)
