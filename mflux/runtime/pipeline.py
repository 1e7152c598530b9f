"""FLUX.1 generation as plain functions over loaded modules: encode the prompt, denoise, decode.

`denoise` is a generator yielding one latent per step; the caller owns evaluation, progress bars and
memory reporting, and may free the text encoders once `encode_prompt` has run.
"""

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from mflux.runtime import sampler


def encode_prompt(clip, t5, clip_ids: np.ndarray, t5_ids: np.ndarray, dtype) -> tuple[mx.array, mx.array]:
    """(txt (B, S, 4096), pooled (B, 768)) in the transformer's dtype."""
    txt = t5(mx.array(t5_ids))
    _, pooled = clip(mx.array(clip_ids))
    return txt.astype(dtype), pooled.astype(dtype)


def denoise(
    flux,
    txt: mx.array,
    pooled: mx.array,
    latents: mx.array,  # (B, L, 64) packed initial noise
    sigmas: list[float],
    height: int,
    width: int,
    guidance: float | None,
    mods: mx.array | None = None,
) -> Iterator[mx.array]:
    """Yield the latent after each Euler step of the flow-matching ODE. `mods` are the steps'
    modulations from `modulations` (computed here when not given)."""
    b = latents.shape[0]
    img_ids = mx.broadcast_to(sampler.image_ids(height, width), (b, latents.shape[1], 3))
    txt_ids = mx.broadcast_to(sampler.text_ids(txt.shape[1]), (b, txt.shape[1], 3))
    # Positions and every step's modulations depend on no latent: compute them once.
    pe = flux.positions(img_ids, txt_ids)
    if mods is None:
        mods = modulations(flux, pooled, sigmas, guidance)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = flux.predict(latents, txt, pe, mods[i])
        latents = sampler.euler_step(latents, v, sigma, sigma_next)
        yield latents


def modulations(flux, pooled: mx.array, sigmas: list[float], guidance: float | None) -> mx.array:
    """(steps, B, K, hidden): every step's modulation rows, which depend only on the timestep, the pooled
    text and the guidance, so one image's are every seed's."""
    b = pooled.shape[0]
    g = None if guidance is None else mx.full((b,), guidance, dtype=mx.float32)
    return flux.modulations(sampler.timesteps(sigmas), pooled, g)


def decode(vae, latents: mx.array, height: int, width: int) -> np.ndarray:
    """Packed latents -> uint8 images (B, H, W, 3), rounded as diffusers' image processor does."""
    z = vae.unscale(sampler.unpack(latents, height, width))  # (B, H/8, W/8, 16)
    image = vae.decode(z.astype(vae_dtype(vae)))
    image = mx.clip(image.astype(mx.float32) / 2 + 0.5, 0, 1)
    return np.array((image * 255).round().astype(mx.uint8))


def vae_dtype(vae):
    return vae.decoder.conv_in.weight.dtype
