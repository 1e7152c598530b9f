"""The generation engine: one generator over loaded modules that every caller drives.

`generate(models, request)` encodes the prompts, prepares each batch's starting latents, denoises them
step by step and decodes them, yielding an event at each stage. Seeds, prompts and the two halves of
true CFG are all rows of one batch axis. The caller owns evaluation timing, progress bars, freeing
memory and saving: after `Conditioned` it may free the text encoders before the transformer is asked
for; after `Modulated` it may free the transformer's conditioning layers; after `Denoised` it may free
the transformer before the last decode. Stopping the iteration stops the work.

The arithmetic follows diffusers' FluxPipeline (text-to-image, true CFG), FluxImg2ImgPipeline,
FluxInpaintPipeline, FluxFillPipeline and FluxKontextPipeline step for step, so the same noise gives the
same image.

Conditioning. What a variant feeds the transformer besides the noisy latents and the prompt is a
`Condition`, made once per request by a small `prepare_*` function (as Black Forest Labs' `sampling.py`
has `prepare_fill`, `prepare_kontext`), and one denoising loop reads it:
- `channels` join the latents on the channel axis, for every image token: Fill's masked-image latents and
  packed mask (`prepare_fill`); Canny's and Depth's control-image latents (`prepare_control`).
- `tokens` are extra image tokens after the target's, at their own position ids `ids`; the transformer
  attends to them, and its output for them is never read back (`prepare_kontext`: the reference image,
  ids with first axis 1).
`Request.condition` names which one a request takes ("text": none; "fill"; "kontext"; "control"), from the
variant's row in runtime/folder.py. Text-side tokens (Redux's image tokens after the prompt's T5 tokens) come
made: `Request.prompt_embeds` replaces the prompts' encoding (FluxPipeline's `prompt_embeds`), and
`redux_embeds` makes them as FluxPriorReduxPipeline does.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from mflux.runtime import memory, sampler


class Models(Protocol):
    """Where the engine gets its modules; each is loaded when first asked for."""

    def get(self, component: str): ...

    def tokenizers(self) -> tuple: ...


@dataclass
class Request:
    """What to make. Rows i of `prompts` and `seeds` are image i."""

    prompts: list[str]
    seeds: list[int]
    height: int
    width: int
    steps: int
    guidance: float | None  # dev's distilled guidance; None for a model without a guidance embedder
    max_sequence_length: int
    shift: dict | None = None  # the sigma shift settings (dev), None for no shift
    negative_prompts: list[str] | None = None  # with true_cfg_scale > 1: true CFG
    true_cfg_scale: float = 1.0
    image: np.ndarray | None = None  # (H, W, 3) uint8 init image, already at height x width
    mask: np.ndarray | None = None  # (H, W) bool, True repaints (inpainting and Fill; needs image)
    strength: float = 1.0  # img2img / inpainting / Fill: 1.0 starts from pure noise
    condition: str = "text"  # "text" | "fill" (image and mask as channels) | "kontext" (reference tokens)
    reference: np.ndarray | None = None  # Kontext: (h, w, 3) uint8, any size that is a multiple of 16
    control: np.ndarray | None = None  # Canny, Depth: (H, W, 3) uint8 edge or depth map at height x width
    prompt_embeds: tuple | None = (
        None  # (txt (1, S, 4096), pooled (1, 768)) for every row, made by the caller
    )
    noise: np.ndarray | None = None  # (B, L, 64) packed initial noise; else drawn from each seed
    batch_size: int = 1
    precompute_modulations: bool = False  # all batches' modulations before the first step
    banded_decode: bool = False  # decode in row bands whatever the size (low memory); the same pixels
    sequence_parallel: object | None = None  # a runtime.parallel.SequenceParallel: each step over its ranks
    dtype: mx.Dtype = mx.float32

    @property
    def true_cfg(self) -> bool:
        return self.true_cfg_scale > 1 and self.negative_prompts is not None


@dataclass
class Conditioned:
    """The prompts are encoded: the text encoders are no longer needed."""

    prompts: list[str]


@dataclass
class Modulated:
    """Every batch's modulations are computed: the transformer's conditioning layers are no longer needed."""


@dataclass
class Denoised:
    """The last batch is denoised, before it is decoded: the transformer is no longer needed."""


@dataclass
class Step:
    step: int  # 1-based
    total: int
    indices: list[int]  # the images of this batch, as rows of the request
    latents: mx.array  # (B, L, 64) after this step


@dataclass
class Decoded:
    indices: list[int]
    pixels: np.ndarray  # (B, H, W, 3) uint8


def generate(
    models: Models, request: Request
) -> Iterator[Conditioned | Modulated | Step | Denoised | Decoded]:
    r = request
    texts = _unique([*r.prompts, *(r.negative_prompts or [])]) if r.true_cfg else _unique(r.prompts)
    if r.prompt_embeds is not None:  # made by the caller (Redux): no text encoder is asked for
        txt, pooled = r.prompt_embeds
        encoded = {t: (txt.astype(r.dtype), pooled.astype(r.dtype)) for t in texts}
    else:
        encoded = encode_prompts(models, texts, r.max_sequence_length, r.dtype)
    yield Conditioned(texts)

    sigmas = schedule(
        r.steps, _seq_len(r.height, r.width), r.shift, r.strength if r.image is not None else 1.0
    )
    image_latents = mask = None
    if r.image is not None:
        image_latents = encode_image(models.get("vae"), r.image[None], r.dtype)  # (1, L, 64)
        mx.eval(image_latents)
        if r.mask is not None and r.condition == "text":  # inpainting blends; Fill's mask is an input
            mask = latent_mask(r.mask, r.height, r.width).astype(r.dtype)
    condition = prepare(models, r)

    transformer = models.get("transformer")
    batches = [
        list(range(i, min(i + r.batch_size, len(r.seeds)))) for i in range(0, len(r.seeds), r.batch_size)
    ]
    mods = {}
    if r.precompute_modulations:
        # block by block (each block's rows evaluated as made), under the tight bound
        with memory.bounded("tight"):
            for rows in batches:
                mods[rows[0]] = _modulations(transformer, r, encoded, rows, sigmas, evaluate=True)
            mx.eval(list(mods.values()))
        yield Modulated()

    for n, rows in enumerate(batches, 1):
        txt, pooled = _conditioning(r, encoded, rows)
        noise = _noise(r, rows)
        x = start_latents(noise, sigmas[0], image_latents)
        m = mods.pop(rows[0]) if rows[0] in mods else _modulations(transformer, r, encoded, rows, sigmas)
        steps = denoise(
            transformer,
            txt,
            x,
            sigmas,
            r.height,
            r.width,
            m,
            r.true_cfg_scale,
            image_latents,
            mask,
            noise,
            r.sequence_parallel,
            condition,
        )
        for i, x in enumerate(steps, 1):
            memory.evaluate(x)
            yield Step(i, len(sigmas) - 1, rows, x)
        if n == len(batches):
            del steps, m  # hold no reference to the transformer, so the caller can free it
            transformer = None
            yield Denoised()
        yield Decoded(rows, decode(models.get("vae"), x, r.height, r.width, r.banded_decode))


@dataclass
class Condition:
    """What the transformer takes besides the noisy latents and the prompt (see the module docstring)."""

    channels: mx.array | None = None  # (1, L, C): joined to each image token's latents
    tokens: mx.array | None = None  # (1, N, 64): image tokens after the target's, not read back
    ids: mx.array | None = None  # (1, N, 3): the position ids of `tokens`


def prepare(models: Models, r: Request) -> Condition:
    """The request's Condition, by `r.condition`; the VAE encodes what it needs before the transformer
    is asked for."""
    if r.condition == "text":
        return Condition()
    if r.condition == "fill":
        return prepare_fill(models.get("vae"), r.image, r.mask, r.dtype)
    if r.condition == "kontext":
        return prepare_kontext(models.get("vae"), r.reference, r.dtype)
    if r.condition == "control":
        return prepare_control(models.get("vae"), r.control, r.dtype)
    raise ValueError(f"unknown condition {r.condition!r}")


def prepare_fill(vae, image: np.ndarray, mask: np.ndarray, dtype) -> Condition:
    """FluxFillPipeline's extra channels: the image with the masked area set to 0 (mid-grey in [-1, 1])
    encoded by the VAE, then the mask at pixel resolution folded 8x8 into each latent cell and packed:
    (1, L, 64 + 256)."""
    keep = 1.0 - mx.array(np.asarray(mask, dtype=np.float32))[None, :, :, None]  # (1, H, W, 1)
    masked = encode_pixels(vae, _to_unit_range(image[None]) * keep, dtype)
    mx.eval(masked)
    return Condition(channels=mx.concatenate([masked, pack_mask(mask).astype(dtype)], axis=-1))


def pack_mask(mask: np.ndarray) -> mx.array:
    """(H, W) -> (1, L, 256): each latent cell's 8x8 pixels as 64 channels (row-major within the cell),
    then 2x2 packed, as FluxFillPipeline.prepare_mask_latents views, permutes and packs its mask."""
    H, W = mask.shape
    m = mx.array(np.asarray(mask, dtype=np.float32)).reshape(1, H // 8, 8, W // 8, 8)
    return sampler.pack(m.transpose(0, 1, 3, 2, 4).reshape(1, H // 8, W // 8, 64))


def prepare_control(vae, control: np.ndarray, dtype) -> Condition:
    """FluxControlPipeline's extra channels: the control image (an edge or depth map at the output's size)
    encoded by the VAE (the posterior's mean) and packed, (1, L, 64)."""
    channels = encode_image(vae, control[None], dtype)
    mx.eval(channels)
    return Condition(channels=channels)


def prepare_kontext(vae, reference: np.ndarray, dtype) -> Condition:
    """FluxKontextPipeline's reference tokens: the image's VAE latents (the posterior mode) packed, at
    position ids (1, row, col) of its own grid, so they sit beside the target's (0, row, col)."""
    h, w = reference.shape[:2]
    tokens = encode_image(vae, reference[None], dtype)  # (1, N, 64)
    mx.eval(tokens)
    ids = sampler.image_ids(h, w)
    ids = mx.concatenate([mx.ones_like(ids[..., :1]), ids[..., 1:]], axis=-1)
    return Condition(tokens=tokens, ids=ids)


def encode_prompts(models: Models, prompts: list[str], max_sequence_length: int, dtype) -> dict:
    """prompt -> (txt (1, S, 4096), pooled (1, 768)), one prompt at a time so a prompt's encoding does
    not depend on what else is in the request."""
    from mflux.runtime.tokenizers import clip_ids, t5_ids

    clip_tok, t5_tok = models.tokenizers()
    clip, t5 = models.get("text_encoder"), models.get("text_encoder_2")
    out = {}
    for p in prompts:
        out[p] = encode_prompt(
            clip, t5, clip_ids(clip_tok, [p]), t5_ids(t5_tok, [p], max_sequence_length), dtype
        )
        memory.evaluate(out[p])
    return out


def redux_embeds(
    image_tokens: mx.array,
    scales: list[float],
    pooled_scales: list[float],
    prompt: tuple | None,
    pooled_width: int = 768,
) -> tuple[mx.array, mx.array]:
    """FluxPriorReduxPipeline's prompt embeddings: each image's tokens (N, L, 4096) after the prompt's T5
    tokens (`prompt`: its (txt (1, 512, 4096), pooled (1, 768)); None: zeros, as the pipeline makes them
    without text encoders), each image's whole sequence times its scale and its pooled vector times its
    pooled scale, summed over the images: (1, 512 + L, 4096), (1, 768). `pooled_width`: the zeros' width
    (the transformer's pooled input; the pipeline writes 768, the real one's)."""
    n = image_tokens.shape[0]
    if prompt is None:
        prompt = mx.zeros((1, 512, image_tokens.shape[-1])), mx.zeros((1, pooled_width))
    txt, pooled = prompt
    txt = mx.broadcast_to(txt.astype(image_tokens.dtype), (n, *txt.shape[1:]))
    sequences = (
        mx.concatenate([txt, image_tokens], axis=1) * mx.array(scales, image_tokens.dtype)[:, None, None]
    )
    pooled = mx.broadcast_to(pooled, (n, pooled.shape[-1])) * mx.array(pooled_scales, pooled.dtype)[:, None]
    return sequences.sum(axis=0, keepdims=True), pooled.sum(axis=0, keepdims=True)


def encode_prompt(clip, t5, clip_ids: np.ndarray, t5_ids: np.ndarray, dtype) -> tuple[mx.array, mx.array]:
    """(txt (B, S, 4096), pooled (B, 768)) in the transformer's dtype."""
    txt = t5(mx.array(t5_ids))
    _, pooled = clip(mx.array(clip_ids))
    return txt.astype(dtype), pooled.astype(dtype)


def schedule(steps: int, image_seq_len: int, shift: dict | None, strength: float = 1.0) -> list[float]:
    """The sigmas to step through, ending in 0. Below strength 1 the first steps are cut as
    FluxImg2ImgPipeline.get_timesteps cuts them, so ceil(steps * strength) steps remain."""
    s = sampler.sigmas(
        steps,
        image_seq_len,
        shift=bool(shift and shift.get("use_dynamic_shifting")),
        base_seq_len=(shift or {}).get("base_image_seq_len", 256),
        max_seq_len=(shift or {}).get("max_image_seq_len", 4096),
        base_shift=(shift or {}).get("base_shift", 0.5),
        max_shift=(shift or {}).get("max_shift", 1.15),
    )
    return s[img2img_start(steps, strength) :]


def img2img_start(steps: int, strength: float) -> int:
    """The steps img2img skips (FluxImg2ImgPipeline.get_timesteps): all of them when `steps * strength`
    is lost in rounding `steps - steps * strength`, which callers refuse (Flux1 checks before any work)."""
    return int(max(steps - min(steps * strength, steps), 0))


def start_latents(noise: mx.array, sigma: float, image_latents: mx.array | None) -> mx.array:
    """Pure noise, or the init image noised to `sigma` (the scheduler's scale_noise)."""
    if image_latents is None:
        return noise
    return scale_noise(image_latents, sigma, noise)


def scale_noise(sample: mx.array, sigma: float, noise: mx.array) -> mx.array:
    s = mx.array(sigma, dtype=mx.float32).astype(sample.dtype)
    return s * noise + (1.0 - s) * sample


def denoise(
    flux,
    txt: mx.array,  # (B, S, 4096), or (2B, S, 4096) with true CFG: positives, then negatives
    latents: mx.array,  # (B, L, 64) starting latents
    sigmas: list[float],
    height: int,
    width: int,
    mods: mx.array,  # (steps, rows of txt, K, hidden) from `modulations`
    true_cfg_scale: float = 1.0,
    image_latents: mx.array | None = None,  # inpainting: the init image's latents (1|B, L, 64)
    mask: mx.array | None = None,  # inpainting: (1, L, 64), 1 repaints
    noise: mx.array | None = None,  # inpainting: the noise that re-noises the kept area
    sp=None,  # a runtime.parallel.SequenceParallel: each transformer pass sharded over its ranks
    condition: Condition | None = None,  # a variant's extra channels or tokens (see `prepare`)
) -> Iterator[mx.array]:
    """Yield the latents after each Euler step of the flow-matching ODE."""
    c = condition or Condition()
    b, rows, n = latents.shape[0], txt.shape[0], latents.shape[1]
    img_ids = sampler.image_ids(height, width)
    if c.tokens is not None:
        img_ids = mx.concatenate([img_ids, c.ids], axis=1)
    img_ids = mx.broadcast_to(img_ids, (rows, img_ids.shape[1], 3))
    txt_ids = mx.broadcast_to(sampler.text_ids(txt.shape[1]), (rows, txt.shape[1], 3))
    pe = flux.positions(img_ids, txt_ids)  # depends on no latent: once
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = _model_input(latents, c)
        x = mx.concatenate([x, x]) if rows > b else x
        v = flux.predict(x, txt, pe, _row(mods, i), sp)[:, :n]  # the target's tokens only
        if rows > b:  # true CFG, as FluxPipeline: neg + scale * (pos - neg)
            v_pos, v_neg = v[:b], v[b:]
            v = v_neg + true_cfg_scale * (v_pos - v_neg)
        latents = sampler.euler_step(latents, v, sigma, sigma_next)
        if mask is not None:  # keep the unmasked area on the init image's path (FluxInpaintPipeline)
            kept = image_latents if i == len(sigmas) - 2 else scale_noise(image_latents, sigma_next, noise)
            latents = (1 - mask) * kept + mask * latents
        yield latents


def _model_input(latents: mx.array, c: Condition) -> mx.array:
    """The latents as the transformer takes them: with the condition's channels, then its tokens."""
    b = latents.shape[0]
    if c.channels is not None:
        channels = mx.broadcast_to(c.channels, (b, *c.channels.shape[1:])).astype(latents.dtype)
        latents = mx.concatenate([latents, channels], axis=-1)
    if c.tokens is not None:
        tokens = mx.broadcast_to(c.tokens, (b, *c.tokens.shape[1:])).astype(latents.dtype)
        latents = mx.concatenate([latents, tokens], axis=1)
    return latents


def modulations(
    flux, pooled: mx.array, sigmas: list[float], guidance: float | None, evaluate: bool = False
) -> mx.array:
    """(steps, B, K, hidden): every step's modulation rows, which depend only on the timestep, the pooled
    text and the guidance, so they are computed once per generation. `evaluate`: block by block (see
    `Flux.block_modulations`)."""
    b = pooled.shape[0]
    g = None if guidance is None else mx.full((b,), guidance, dtype=mx.float32)
    return flux.modulations(sampler.timesteps(sigmas), pooled, g, evaluate)


def decode(vae, latents: mx.array, height: int, width: int, banded: bool = False) -> np.ndarray:
    """Packed latents -> uint8 images (B, H, W, 3), rounded as diffusers' image processor does;
    `banded` decodes in row bands whatever the size (the same pixels, a lower peak)."""
    z = vae.unscale(sampler.unpack(latents, height, width))  # (B, H/8, W/8, 16)
    with memory.bounded():
        image = vae.decode(z.astype(vae_dtype(vae)), band_bytes="always" if banded else "auto")
        image = mx.clip(image.astype(mx.float32) / 2 + 0.5, 0, 1)
        pixels = (image * 255).round().astype(mx.uint8)
        mx.eval(pixels)
    return np.array(pixels)


def encode_image(vae, pixels: np.ndarray, dtype) -> mx.array:
    """uint8 images (B, H, W, 3) -> packed latents (B, L, 64) in the transformer's space: the VAE
    posterior's mean, shifted and scaled, as FluxImg2ImgPipeline encodes its init image."""
    return encode_pixels(vae, _to_unit_range(pixels), dtype)


def encode_pixels(vae, x: mx.array, dtype) -> mx.array:
    """Images in [-1, 1] (B, H, W, 3) -> packed latents (B, L, 64) in the transformer's space."""
    z = vae.encode(x.astype(vae_dtype(vae)))  # (B, H/8, W/8, 16)
    return sampler.pack(vae.scale(z).astype(dtype))


def _to_unit_range(pixels: np.ndarray) -> mx.array:
    """uint8 -> float32 in [-1, 1], as diffusers' preprocess: [0, 1], then [-1, 1]."""
    return mx.array(pixels).astype(mx.float32) / 255.0 * 2 - 1


def latent_mask(mask: np.ndarray, height: int, width: int) -> mx.array:
    """(H, W) bool -> (1, L, 64): nearest-neighbour down to the latent grid, as FluxInpaintPipeline does
    (torch's interpolate picks pixel (8i, 8j)), repeated over the 16 latent channels and packed."""
    h, w = 2 * (height // 16), 2 * (width // 16)
    small = np.asarray(mask, dtype=np.float32)[::8, ::8][:h, :w]
    z = mx.broadcast_to(mx.array(small)[None, :, :, None], (1, h, w, 16))
    return sampler.pack(z)


def _row(a: mx.array, i: int) -> mx.array:
    """`a[i]` as a view: MLX makes `a[i]` a gather, a kernel CUDA builds at run time (4 s on a first step)."""
    return a[i : i + 1].squeeze(0)


def vae_dtype(vae):
    return vae.decoder.conv_in.weight.dtype


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _seq_len(height: int, width: int) -> int:
    return (height // 16) * (width // 16)


def _conditioning(r: Request, encoded: dict, rows: list[int]) -> tuple[mx.array, mx.array]:
    texts = [r.prompts[i] for i in rows]
    if r.true_cfg:
        texts += [r.negative_prompts[i] for i in rows]
    txt = mx.concatenate([encoded[t][0] for t in texts])
    pooled = mx.concatenate([encoded[t][1] for t in texts])
    return txt, pooled


def _modulations(
    transformer, r: Request, encoded: dict, rows: list[int], sigmas: list[float], evaluate: bool = False
) -> mx.array:
    return modulations(transformer, _conditioning(r, encoded, rows)[1], sigmas, r.guidance, evaluate)


def _noise(r: Request, rows: list[int]) -> mx.array:
    if r.noise is not None:
        return mx.array(np.asarray(r.noise, dtype=np.float32)[rows]).astype(r.dtype)
    # each image's noise from its own seed, whatever the batch
    return mx.concatenate([sampler.noise(r.seeds[i], r.height, r.width) for i in rows]).astype(r.dtype)
