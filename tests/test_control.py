"""Canny and Depth (FluxControlPipeline) against diffusers at float32 on tiny random checkpoints, fed the same
noise: the control image's latents join the latents on the channel axis. As in test_kontext_fill.py the VAE
posterior sample is patched to its mean, and the denoised latents are compared too, since a tiny random
transformer barely moves pixels with the extra channels."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mflux import Config, Flux1
from mflux.errors import InvalidArgument, MfluxError
from mflux.runtime import engine
from tests.test_generation import BOUND, PROMPT, diff, init_image, noise
from tests.test_kontext_fill import LATENT_BOUND, LATENT_GAP, _diffusers, gap, ours, reference

H, W = 32, 48


def edges(height: int, width: int) -> Image.Image:
    """A white-on-black edge map, as a Canny detector draws one."""
    m = np.zeros((height, width), np.uint8)
    m[height // 4, :] = m[:, width // 3] = m[3 * height // 4, width // 4 :] = 255
    return Image.fromarray(m).convert("RGB")


@pytest.fixture(scope="module")
def canny_pipe(tiny_canny):
    return _diffusers("FluxControlPipeline", tiny_canny)


def canny_case(pipe, control, eps, steps=3, guidance=30.0):
    config = Config(steps, H, W, guidance=guidance)
    want = reference(
        pipe, eps, prompt=PROMPT, control_image=control, height=H, width=W, num_inference_steps=steps,
        guidance_scale=guidance,
    )  # fmt: skip
    return config, want


@pytest.mark.parametrize("size", [(W, H), (96, 64)])  # the output's size, and a map to be resized to it
def test_canny_equals_diffusers(size, tiny_canny, canny_pipe, posterior_mean):
    control = edges(size[1], size[0])
    eps = noise(1, H, W, seed=23)
    config, (want, want_latents) = canny_case(canny_pipe, control, eps)
    flux = Flux1.from_path(tiny_canny, variant="canny", precision="float32")
    image, latents = ours(flux, PROMPT, config, eps, control_image=control)
    d, g = diff(image.image, want), gap(latents, want_latents)
    print(f"canny (map {size[0]}x{size[1]}) vs diffusers: max |diff| {d}/255, latents {g:.1e}")
    assert d <= BOUND and g <= LATENT_BOUND
    assert image.metadata["variant"] == "canny"


@pytest.mark.parametrize("breakage", ["channel_order", "no_control"])
def test_broken_control_conditioning_fails_the_comparison(
    breakage, tiny_canny, canny_pipe, posterior_mean, monkeypatch
):
    control = edges(H, W)
    eps = noise(1, H, W, seed=23)
    config, (_, want_latents) = canny_case(canny_pipe, control, eps, steps=2)
    prepare = engine.prepare_control

    def broken(vae, image, dtype):
        c = prepare(vae, image, dtype)
        c.channels = mx.zeros_like(c.channels) if breakage == "no_control" else c.channels
        return c

    if breakage == "channel_order":  # the control latents before the noisy ones
        model_input = engine._model_input

        def swapped(latents, c):
            x = model_input(latents, c)
            return mx.concatenate([x[..., 64:], x[..., :64]], axis=-1)

        monkeypatch.setattr(engine, "_model_input", swapped)
    monkeypatch.setattr(engine, "prepare_control", broken)
    flux = Flux1.from_path(tiny_canny, variant="canny", precision="float32")
    _, latents = ours(flux, PROMPT, config, eps, control_image=control)
    assert gap(latents, want_latents) > LATENT_GAP


def test_canny_and_depth_are_told_apart_only_by_name(tiny_canny, tiny_depth):
    with pytest.raises(MfluxError, match="can't tell canny from depth: name it with --variant"):
        Flux1.from_path(tiny_canny)
    assert Flux1.from_path(tiny_depth, variant="depth").folder.defaults["steps"] == 30
    assert Flux1.from_path(tiny_canny, variant="canny").folder.defaults["guidance"] == 30.0


def test_control_arguments_are_refused_before_any_load(tiny_canny, tiny_dev):
    canny = Flux1.from_path(tiny_canny, variant="canny", precision="float32")
    dev = Flux1.from_path(tiny_dev, precision="float32")
    control = edges(H, W)
    cases = [
        (canny, {}, "canny follows a control image: give control_image="),
        (canny, dict(control_image=control, image=init_image(H, W)), "is not supported yet"),
        (dev, dict(control_image=control), "control_image= needs a canny or depth model; dev takes none"),
    ]
    for flux, kwargs, words in cases:
        with pytest.raises(InvalidArgument, match=words):
            flux.generate_image(0, PROMPT, Config(1, H, W), **kwargs)
        assert not flux.models.modules


def test_cli_canny_follows_a_map_and_replays_exactly(tiny_canny, tmp_path):
    from tests.test_kontext_fill import _cli, _meta

    edges(64, 96).save(tmp_path / "edges.png")
    args = ["--path", str(tiny_canny), "--variant", "canny", "--steps", "2", "--seed", "6"]
    made = _cli(*args, "--control", "edges.png", "--prompt", PROMPT, "-o", "c.png", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    m = _meta(tmp_path / "c.png")
    assert (m["variant"], m["guidance"], m["width"], m["height"]) == ("canny", 30.0, 96, 64)  # the map's size
    assert len(m["control_sha256"]) == 64 and Image.open(tmp_path / "c.png").text["ControlImage"]
    again = _cli(
        "--path", str(tiny_canny), "--variant", "canny", "--from", "c.png", "-o", "d.png", cwd=tmp_path
    )
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.array(Image.open(tmp_path / "c.png")), np.array(Image.open(tmp_path / "d.png")))


@pytest.mark.parametrize(
    "variant, extra, words",
    [
        ("canny", [], "canny follows an edge or depth map: give --control IMAGE"),
        ("canny", ["--control", "edges.png", "--image", "edges.png"], "is not supported yet"),
        ("canny", ["--control", "notes.png"], "not an image PIL can read"),
        ("dev", ["--control", "edges.png"], "--control needs a control model (-m canny or -m depth)"),
    ],
)
def test_cli_refuses_control_misuse_before_any_load(
    variant, extra, words, tmp_path, monkeypatch, tiny_canny, tiny_dev
):
    import mflux.flux1
    from tests.test_kontext_fill import _cli

    edges(H, W).save(tmp_path / "edges.png")
    (tmp_path / "notes.png").write_text("not an image")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was opened before the settings were refused")

    monkeypatch.setattr(mflux.flux1.Flux1, "__init__", no_load)
    folder = (
        ["--path", str(tiny_canny), "--variant", "canny"] if variant == "canny" else ["--path", str(tiny_dev)]
    )
    result = _cli(*folder, "--prompt", PROMPT, "--steps", "1", *extra, cwd=tmp_path)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and words in lines[0], result.output
