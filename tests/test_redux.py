"""Redux against diffusers' FluxPriorReduxPipeline then FluxPipeline at float32, on the tiny Redux folder and
the tiny dev and schnell pipelines, fed the same noise: with and without a prompt, with two weighted images.

The prior pipeline without text encoders writes zeros of the real widths (512 x 4096 and 768), which the tiny
pipelines' 64-wide T5 and pooled inputs can't take: the test gives its module a `torch` whose `zeros` writes
the tiny widths, so diffusers' own concatenation, scaling and sum still make the reference."""

import types

import mlx.core as mx
import numpy as np
import pytest

from mflux import Config, Flux1, ReduxPrior
from mflux.errors import InvalidArgument
from mflux.runtime import engine
from tests.test_generation import BOUND, NEGATIVE, PROMPT, diff, init_image, to_uint8
from tests.test_kontext_fill import LATENT_BOUND, LATENT_GAP, _diffusers, gap, ours

H, W = 32, 32


@pytest.fixture(scope="module")
def prior(tiny_redux):
    return _diffusers("FluxPriorReduxPipeline", tiny_redux)


def _tiny_zeros(module, monkeypatch):
    import torch

    def zeros(shape, **kwargs):
        shape = tuple({4096: 64, 768: 64}.get(n, n) for n in shape)
        return torch.zeros(shape, **kwargs)

    monkeypatch.setattr(module, "torch", types.SimpleNamespace(**{**vars(torch), "zeros": zeros}))


def diffusers_embeds(prior, folder, images, prompt, scales, monkeypatch):
    """(prompt_embeds, pooled) from FluxPriorReduxPipeline, with the tiny pipeline's text encoders for a
    prompt (as diffusers' docs load them into the prior), else without."""
    import torch
    from diffusers.pipelines.flux import pipeline_flux_prior_redux

    from tests.fixtures import _pipeline

    pipe = _pipeline(str(folder.resolve()), "float32")
    if prompt is None:
        _tiny_zeros(pipeline_flux_prior_redux, monkeypatch)
        encoders = {}
    else:
        encoders = dict(
            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
        )  # fmt: skip
    redux = type(prior)(
        image_encoder=prior.image_encoder, feature_extractor=prior.feature_extractor,
        image_embedder=prior.image_embedder, **encoders,
    )  # fmt: skip
    with torch.no_grad():
        out = redux(
            images if len(images) > 1 else images[0], prompt=prompt,
            prompt_embeds_scale=scales, pooled_prompt_embeds_scale=scales, return_dict=True,
        )  # fmt: skip
    return pipe, out.prompt_embeds, out.pooled_prompt_embeds


CASES = {
    "one image": ([init_image(40, 56)], None, 1.0),
    "with a prompt": ([init_image(40, 56)], PROMPT, 1.0),
    "two weighted images": ([init_image(40, 56), init_image(64, 48).rotate(90)], None, [0.7, 0.4]),
}


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("case", list(CASES))
def test_redux_equals_diffusers(case, variant, tiny_redux, tiny_dev, tiny_schnell, prior, monkeypatch):
    import torch

    images, prompt, scales = CASES[case]
    folder = tiny_dev if variant == "dev" else tiny_schnell
    pipe, want_txt, want_pooled = diffusers_embeds(prior, folder, images, prompt, scales, monkeypatch)
    flux = Flux1.from_path(folder, precision="float32")
    embeds = ReduxPrior.from_path(tiny_redux, precision="float32")(
        flux, images, prompt, prompt_embeds_scale=scales, pooled_prompt_embeds_scale=scales
    )
    g_txt = gap(np.array(embeds.txt), want_txt.numpy())
    assert embeds.txt.shape == tuple(want_txt.shape) and g_txt <= LATENT_BOUND * max(
        1, float(want_txt.abs().max())
    )
    eps = np.random.default_rng(3).standard_normal((1, H * W // 256, 64), dtype=np.float32)
    steps, guidance = 2, 3.5
    with torch.no_grad():
        kw = dict(prompt_embeds=want_txt, pooled_prompt_embeds=want_pooled, latents=torch.from_numpy(eps))
        common = dict(height=H, width=W, num_inference_steps=steps, guidance_scale=guidance, **kw)
        want = to_uint8(pipe(output_type="np", **common).images)[0]
        want_latents = pipe(output_type="latent", **common).images.numpy()
    config = Config(steps, H, W, guidance=guidance)
    image, latents = ours(flux, None, config, eps, prompt_embeds=embeds)
    d, g = diff(image.image, want), gap(latents, want_latents)
    print(f"redux {case} on {variant} vs diffusers: max |diff| {d}/255, latents {g:.1e}")
    assert d <= BOUND and g <= LATENT_BOUND
    assert image.metadata["redux_scales"] == ([scales] if isinstance(scales, float) else scales)
    assert image.metadata["prompt"] == (prompt or "")


def test_broken_token_concatenation_fails(tiny_redux, tiny_dev, prior, monkeypatch):
    """The image tokens before the prompt's instead of after: the embeddings differ from diffusers'."""
    images, prompt, scales = CASES["with a prompt"]
    _, want_txt, _ = diffusers_embeds(prior, tiny_dev, images, prompt, scales, monkeypatch)
    flux = Flux1.from_path(tiny_dev, precision="float32")
    redux = engine.redux_embeds

    def image_tokens_first(tokens, s, ps, encoded, width):
        txt, pooled = redux(tokens, s, ps, encoded, width)
        n = encoded[0].shape[1]
        return mx.concatenate([txt[:, n:], txt[:, :n]], axis=1), pooled

    monkeypatch.setattr(engine, "redux_embeds", image_tokens_first)
    embeds = ReduxPrior.from_path(tiny_redux, precision="float32")(flux, images, prompt)
    assert gap(np.array(embeds.txt), want_txt.numpy()) > LATENT_GAP


def test_redux_misuse_is_refused(tiny_redux, tiny_dev, tmp_path):
    flux = Flux1.from_path(tiny_dev, precision="float32")
    prior = ReduxPrior.from_path(tiny_redux, precision="float32")
    embeds = prior(flux, init_image(32, 32))
    config = Config(1, H, W)
    with pytest.raises(InvalidArgument, match="not both"):
        flux.generate_image(0, PROMPT, config, prompt_embeds=embeds)
    with pytest.raises(InvalidArgument, match="true CFG with Redux"):
        flux.generate_image(0, None, config, prompt_embeds=embeds, negative_prompt=NEGATIVE)
    with pytest.raises(InvalidArgument, match="one per image"):
        prior(flux, [init_image(32, 32)] * 2, prompt_embeds_scale=[1.0])
    with pytest.raises(InvalidArgument, match="at least one image"):
        prior(flux, [])
    with pytest.raises(Exception, match="not a FLUX.1 Redux folder"):
        ReduxPrior.from_path(tmp_path)
