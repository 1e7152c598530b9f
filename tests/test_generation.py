"""Batches, true CFG, img2img and inpainting against diffusers' pipelines, fed the same noise.

mflux encodes an init image to the VAE posterior's mean; diffusers is made to do the same by patching
DiagonalGaussianDistribution.sample to return the mean. The noise ε goes in as mflux's `latents=` (the
packed initial noise) and, on diffusers' side, through the `randn_tensor` each pipeline module binds
(img2img, inpaint), unpacked to (B, 16, h, w). It is never passed as diffusers' `latents=` there, which
is the already-noised start.
"""

import contextlib

import numpy as np
import pytest
from PIL import Image

from mflux import Config, Flux1
from tests.fixtures import _pipeline

PROMPT = "Luxury food photograph"
NEGATIVE = "a red bicycle"
BOUND = 2  # /255 at float32, the bound; measured values are printed


def noise(batch: int, height: int, width: int, seed: int = 11) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, (height // 16) * (width // 16), 64), dtype=np.float32)


def init_image(height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) % 64 * 4], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def mask_image(height: int, width: int) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[height // 4 : 3 * height // 4, width // 8 : width // 2] = 255
    return Image.fromarray(m, "L")


def to_uint8(images) -> list[np.ndarray]:
    return [(np.asarray(im) * 255).round().astype(np.uint8) for im in images]


@contextlib.contextmanager
def same_noise(module, eps: np.ndarray, pipe, height: int, width: int):
    """diffusers draws ε with `module.randn_tensor` and encodes images to the posterior's mean."""
    import torch
    from diffusers.models.autoencoders import vae as vae_module

    unpacked = pipe._unpack_latents(torch.from_numpy(eps), height, width, pipe.vae_scale_factor)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "randn_tensor", lambda shape, **kw: unpacked.to(kw.get("dtype") or torch.float32))
        mp.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
        yield


def diff(ours, ref) -> int:
    return int(np.abs(np.asarray(ours).astype(int) - np.asarray(ref).astype(int)).max())


def test_text_to_image_batch_equals_diffusers(tiny_dev):
    h, w, steps = 32, 48, 2
    prompts = [PROMPT, NEGATIVE, PROMPT]
    eps = noise(3, h, w)
    pipe = _pipeline(str(tiny_dev.resolve()), "float32")
    import torch

    with torch.no_grad():
        ref = pipe(
            prompts, height=h, width=w, num_inference_steps=steps, guidance_scale=4.0,
            latents=torch.from_numpy(eps), max_sequence_length=512, output_type="np",
        ).images  # fmt: skip
    flux = Flux1.from_path(tiny_dev, precision="float32")
    ours = flux.generate_images(
        [0, 1, 2], prompts, Config(steps, h, w, guidance=4.0), latents=eps, batch_size=3
    )
    diffs = [diff(o.image, r) for o, r in zip(ours, to_uint8(ref))]
    print(f"batch of 3 vs diffusers: max |diff| {diffs}/255")
    assert max(diffs) <= BOUND
    assert diff(ours[0].image, ours[1].image) > 10  # different prompts, different images


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_true_cfg_equals_diffusers(variant, tiny_schnell, tiny_dev):
    folder = tiny_schnell if variant == "schnell" else tiny_dev
    h, w, steps, scale = 32, 32, 2, 4.0
    eps = noise(2, h, w, seed=3)
    pipe = _pipeline(str(folder.resolve()), "float32")
    import torch

    with torch.no_grad():
        ref = pipe(
            [PROMPT, PROMPT], negative_prompt=[NEGATIVE, NEGATIVE], true_cfg_scale=scale, height=h, width=w,
            num_inference_steps=steps, guidance_scale=3.0, latents=torch.from_numpy(eps), output_type="np",
            max_sequence_length=512 if variant == "dev" else 256,
        ).images  # fmt: skip
    flux = Flux1.from_path(folder, precision="float32")
    config = Config(steps, h, w, guidance=3.0)
    ours = flux.generate_images(
        [0, 1], PROMPT, config, negative_prompt=NEGATIVE, true_cfg_scale=scale, latents=eps, batch_size=2
    )
    plain = flux.generate_images([0, 1], PROMPT, config, latents=eps)
    diffs = [diff(o.image, r) for o, r in zip(ours, to_uint8(ref))]
    print(f"{variant} true CFG vs diffusers: max |diff| {diffs}/255")
    assert max(diffs) <= BOUND
    assert diff(ours[0].image, plain[0].image) > 10  # the negative prompt changed the image
    assert ours[0].metadata["true_cfg_scale"] == scale and ours[0].metadata["negative_prompt"] == NEGATIVE


@pytest.mark.parametrize("strength", [1.0, 0.6, 0.3])
def test_img2img_equals_diffusers(strength, tiny_dev):
    from diffusers import FluxImg2ImgPipeline
    from diffusers.pipelines.flux import pipeline_flux_img2img

    h, w, steps = 48, 32, 4
    eps = noise(1, h, w, seed=5)
    image = init_image(h, w)
    pipe = FluxImg2ImgPipeline.from_pipe(_pipeline(str(tiny_dev.resolve()), "float32"))
    import torch

    with same_noise(pipeline_flux_img2img, eps, pipe, h, w), torch.no_grad():
        ref = pipe(
            PROMPT, image=image, strength=strength, height=h, width=w, num_inference_steps=steps,
            guidance_scale=4.0, max_sequence_length=512, output_type="np",
        ).images  # fmt: skip
    flux = Flux1.from_path(tiny_dev, precision="float32")
    ours = flux.generate_image(
        0, PROMPT, Config(steps, h, w, guidance=4.0), latents=eps, image=image, strength=strength
    )
    d = diff(ours.image, to_uint8(ref)[0])
    print(f"img2img strength {strength} vs diffusers: max |diff| {d}/255")
    assert d <= BOUND
    assert ours.metadata["strength"] == strength
    if strength < 1:  # the init image shows through
        text2img = flux.generate_image(0, PROMPT, Config(steps, h, w, guidance=4.0), latents=eps)
        assert diff(ours.image, text2img.image) > 10


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_equals_diffusers(strength, tiny_schnell):
    from diffusers import FluxInpaintPipeline
    from diffusers.pipelines.flux import pipeline_flux_inpaint

    h, w, steps = 32, 48, 3
    eps = noise(1, h, w, seed=7)
    image, mask = init_image(h, w), mask_image(h, w)
    pipe = FluxInpaintPipeline.from_pipe(_pipeline(str(tiny_schnell.resolve()), "float32"))
    import torch

    with same_noise(pipeline_flux_inpaint, eps, pipe, h, w), torch.no_grad():
        ref = pipe(
            PROMPT, image=image, mask_image=mask, strength=strength, height=h, width=w,
            num_inference_steps=steps, max_sequence_length=256, output_type="np",
        ).images  # fmt: skip
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    ours = flux.generate_image(
        0, PROMPT, Config(steps, h, w), latents=eps, image=image, mask_image=mask, strength=strength
    )
    d = diff(ours.image, to_uint8(ref)[0])
    print(f"inpainting strength {strength} vs diffusers: max |diff| {d}/255")
    assert d <= BOUND
    # outside the mask the image stays near the init image (the VAE round trip of a tiny random VAE
    # changes it, so compare against img2img with the same noise: inpainting must differ from it)
    img2img = flux.generate_image(0, PROMPT, Config(steps, h, w), latents=eps, image=image, strength=strength)
    assert diff(ours.image, img2img.image) > 10


def test_an_init_image_of_another_size_is_cropped_to_fit(tiny_schnell):
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    config = Config(2, 32, 32)
    exact = flux.generate_image(1, PROMPT, config, image=init_image(32, 32).resize((64, 64)), strength=0.5)
    assert exact.image.size == (32, 32)
    wide = init_image(32, 64)  # cropped to its middle 32x32 after scaling to cover
    cropped = wide.crop((16, 0, 48, 32))
    a = flux.generate_image(1, PROMPT, config, image=wide, strength=0.5)
    b = flux.generate_image(1, PROMPT, config, image=cropped, strength=0.5)
    assert np.array_equal(np.array(a.image), np.array(b.image))


def test_bad_generation_arguments_are_refused_before_loading(tiny_schnell, tmp_path):
    from mflux.errors import InvalidArgument

    flux = Flux1.from_path(tiny_schnell, precision="float32")
    config = Config(1, 32, 32)
    not_an_image = tmp_path / "x.png"
    not_an_image.write_text("hello")
    cases = [
        (dict(image=init_image(32, 32), strength=0), "strength must be in"),
        (dict(image=init_image(32, 32), strength=1.5), "strength must be in"),
        (dict(mask_image=mask_image(32, 32)), "need an init image"),
        (dict(image=tmp_path / "missing.png"), "missing.png: no such file"),
        (dict(image=not_an_image), "x.png: not an image PIL can read"),
        (dict(true_cfg_scale=float("nan"), negative_prompt="x"), "finite"),
        (dict(image=init_image(32, 32), mask_image=mask_image(16, 32)), "give a mask of the image's size"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            flux.generate_image(1, PROMPT, config, **kwargs)
    assert flux.models.modules == {}
    with pytest.raises(InvalidArgument, match="finite"):
        Config(1, 32, 32, guidance=float("nan"))
    with pytest.raises(InvalidArgument, match="maximum"):
        Config(1, 1024, 100000)
