"""Encode the training set once (VAE latents, T5 and CLIP embeddings) into a cache on disk, then free the
encoders; and draw a validation image with the LoRA being trained."""

from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mflux.runtime import engine, sampler
from mflux.runtime.folder import ModelFolder
from mflux.runtime.loader import load_component, load_tokenizers
from mflux.train.data import Example, cache_key, load_image
from mflux.train.files import atomic_save


def encode_dataset(
    folder: ModelFolder,
    examples: list[Example],
    resolution: int,
    dtype: mx.Dtype,
    prompts: list[str],
    path: Path,
    seq_len: int,
) -> tuple[dict[str, mx.array], bool]:
    """({"latents" (N, L, 64) float32, "txt" (U, S, context), "pooled" (U, vec), "caption" (N,) the row of
    each example's caption among the U distinct ones, "validation_txt", "validation_pooled"},
    whether it was encoded now rather than read from the cache).

    Read from `path` when its key matches the files, captions and settings; else computed (one
    component in memory at a time) and written there. The latents are the VAE posterior's mean, scaled
    as the transformer sees them, as FluxImg2ImgPipeline encodes an image (the script draws a sample
    of the posterior each time; a cache holds one encoding either way)."""
    # absolute: a resumed run names the model folder by its recorded absolute path
    key = cache_key(examples, f"{folder.path.absolute()} {dtype}", resolution, seq_len, prompts)
    if path.is_file():
        arrays, meta = mx.load(str(path), return_metadata=True)
        if meta.get("key") == key:
            return arrays, False
    captions = sorted({e.caption for e in examples})
    arrays = {"latents": _latents(folder, examples, resolution, dtype)}
    txt, pooled = _embed(folder, captions + prompts, seq_len, dtype)
    arrays["txt"], arrays["pooled"] = txt[: len(captions)], pooled[: len(captions)]
    arrays["caption"] = mx.array([captions.index(e.caption) for e in examples], dtype=mx.int32)
    if prompts:
        arrays["validation_txt"], arrays["validation_pooled"] = txt[len(captions) :], pooled[len(captions) :]
    mx.eval(arrays)
    atomic_save(path, arrays, {"key": key})
    return arrays, True


def _latents(folder: ModelFolder, examples: list[Example], resolution: int, dtype) -> mx.array:
    vae = load_component(folder, "vae", dtype)
    out = []
    for e in examples:  # one image at a time: the encoder's activations dominate its memory
        out.append(engine.encode_image(vae, load_image(e.image, resolution)[None], mx.float32)[0])
        mx.eval(out[-1])
    del vae
    mx.clear_cache()
    return mx.stack(out)  # (N, L, 64)


def _embed(folder: ModelFolder, texts: list[str], seq_len: int, dtype) -> tuple[mx.array, mx.array]:
    from mflux.runtime.tokenizers import clip_ids, t5_ids

    clip_tok, t5_tok = load_tokenizers(folder)
    t5 = load_component(folder, "text_encoder_2", dtype)
    txt = [t5(mx.array(t5_ids(t5_tok, [t], seq_len))) for t in texts]
    mx.eval(txt)
    del t5
    mx.clear_cache()
    clip = load_component(folder, "text_encoder", dtype)
    pooled = [clip(mx.array(clip_ids(clip_tok, [t])))[1] for t in texts]
    mx.eval(pooled)
    del clip
    mx.clear_cache()
    return mx.concatenate(txt).astype(dtype), mx.concatenate(pooled).astype(dtype)


def validation_image(
    flux, folder: ModelFolder, txt: mx.array, pooled: mx.array, resolution: int, seed: int, dtype, guidance
) -> Image.Image:
    """One image of the validation prompt at a fixed seed, with the LoRA as it is now. Loads the VAE
    for the decode only (it is small) and frees it after."""
    d = folder.defaults
    x = sampler.noise(seed, resolution, resolution).astype(dtype)
    sigmas = engine.schedule(d["steps"], x.shape[1], d if d.get("use_dynamic_shifting") else None)
    mods = engine.modulations(flux, pooled, sigmas, guidance if flux.params.guidance_embed else None)
    for latents in engine.denoise(flux, txt, x, sigmas, resolution, resolution, mods):
        mx.eval(latents)
        x = latents
    vae = load_component(folder, "vae", dtype)
    pixels = engine.decode(vae, x, resolution, resolution)
    del vae
    mx.clear_cache()
    return Image.fromarray(np.asarray(pixels[0]))
