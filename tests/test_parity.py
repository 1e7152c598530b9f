"""The whole pipeline against diffusers' FluxPipeline: same folder, same packed initial latents."""

import numpy as np
import pytest

from mflux import Config, Flux1
from tests.fixtures import packed_latents, reference_image

PROMPT = "Luxury food photograph"
# Measured on the tiny checkpoints: float32 differs by at most 1/255 (rounding at the 8-bit step).
# bfloat16 differs more, since both sides round every matmul to 8 mantissa bits, in different orders:
# measured max 8/255 (schnell) and 7/255 (dev), mean under 1/255. The bound leaves a little room.
FLOAT32_BOUND = 2
BFLOAT16_BOUND = 12


@pytest.mark.parametrize(
    "variant, height, width, steps",
    [
        ("schnell", 64, 64, 1),
        ("schnell", 48, 80, 4),
        ("dev", 64, 64, 2),
        ("dev", 80, 48, 3),
    ],
)
def test_float32_matches_diffusers(variant, height, width, steps, tiny_schnell, tiny_dev):
    folder = tiny_schnell if variant == "schnell" else tiny_dev
    latents = packed_latents(seed=3, height=height, width=width)
    ref = reference_image(
        folder, PROMPT, height=height, width=width, steps=steps, guidance=4.0, latents=latents
    )
    flux = Flux1.from_path(folder, precision="float32")
    config = Config(num_inference_steps=steps, height=height, width=width, guidance=4.0)
    ours = np.array(flux.generate_image(seed=0, prompt=PROMPT, config=config, latents=latents).image)
    assert ours.shape == ref.shape == (height, width, 3)
    assert ref.std() > 10  # the test image is not flat, so equality means something
    diff = np.abs(ours.astype(int) - ref.astype(int)).max()
    print(f"{variant} {width}x{height} {steps} steps: max |diff| = {diff}/255")
    assert diff <= FLOAT32_BOUND


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_bfloat16_close_to_diffusers(variant, tiny_schnell, tiny_dev):
    folder = tiny_schnell if variant == "schnell" else tiny_dev
    latents = packed_latents(seed=5, height=64, width=48)
    ref = reference_image(folder, PROMPT, height=64, width=48, steps=2, latents=latents, dtype="bfloat16")
    flux = Flux1.from_path(folder, precision="bfloat16")
    config = Config(num_inference_steps=2, height=64, width=48)
    ours = np.array(flux.generate_image(seed=0, prompt=PROMPT, config=config, latents=latents).image)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    print(f"{variant} bfloat16: max |diff| = {diff.max()}/255, mean {diff.mean():.2f}")
    assert diff.max() <= BFLOAT16_BOUND


def test_prefixed_and_unprefixed_clip_give_the_same_image(tiny_schnell, tiny_schnell_unprefixed):
    latents = packed_latents(seed=1, height=32, width=32)
    config = Config(num_inference_steps=1, height=32, width=32)
    a = Flux1.from_path(tiny_schnell, precision="float32").generate_image(0, PROMPT, config, latents=latents)
    b = Flux1.from_path(tiny_schnell_unprefixed, precision="float32").generate_image(
        0, PROMPT, config, latents=latents
    )
    assert np.array_equal(np.array(a.image), np.array(b.image))


def test_one_model_many_images(tiny_dev):
    """Freeing the text encoders between images must not break the next prompt."""
    flux = Flux1.from_path(tiny_dev, precision="float32")
    config = Config(num_inference_steps=1, height=32, width=32)
    first = np.array(flux.generate_image(1, PROMPT, config).image)
    flux.free_text_encoders()
    other_prompt = np.array(flux.generate_image(1, "a red bicycle", config).image)
    again = np.array(flux.generate_image(1, PROMPT, config).image)
    other_seed = np.array(flux.generate_image(2, PROMPT, config).image)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_prompt)
    assert not np.array_equal(first, other_seed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=30), "multiple of 16"),
        (dict(width=0), "multiple of 16"),
        (dict(num_inference_steps=0), "steps"),
    ],
)
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


def test_bad_latents_and_prompt_raise_value_error(tiny_schnell):
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    config = Config(num_inference_steps=1, height=32, width=32)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 64\)"):
        flux.generate_image(0, PROMPT, config, latents=np.zeros((1, 5, 64), np.float32))
    for prompt in (None, 3, ["a", 3]):  # "" and blanks are prompts, as in diffusers
        with pytest.raises(ValueError, match="prompt"):
            flux.generate_image(0, prompt, config)
