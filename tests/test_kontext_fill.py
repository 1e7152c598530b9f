"""Kontext and Fill against diffusers' FluxKontextPipeline and FluxFillPipeline, fed the same noise, at
float32 on tiny random checkpoints in the real diffusers layout; and the conditioning pieces (reference
token ids, reading back only the target's tokens, mask packing, channel order) broken on purpose, which
the comparison must catch.

As in test_generation.py, diffusers' VAE posterior sample is patched to its mean (Fill encodes its masked
image with a sample; mflux with the mean). ε goes in as both sides' `latents=`, which both pipelines take
as the packed start at strength 1.
"""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mflux import Config, Flux1
from mflux.errors import InvalidArgument
from mflux.flux1 import ImageEvent, StepEvent, expanded, kontext_reference, kontext_size
from mflux.runtime import engine, sampler
from tests.test_generation import BOUND, NEGATIVE, PROMPT, diff, init_image, mask_image, noise, to_uint8

EDIT = "make it a snowy winter evening"
# Tiny random transformers barely move pixels with the extra conditioning (a reference changes a 3-step
# image by about 2/255), so the conditioning is checked on the denoised latents too: mflux's equal
# diffusers' to float32 rounding (measured 4e-6), while a missing or broken condition moves them by 1e-3
# and more (9e-3 without the reference).
LATENT_BOUND = 1e-4
LATENT_GAP = 1e-3


def _diffusers(cls_name: str, folder):
    import diffusers
    import torch

    from tests.fixtures import _quiet

    with _quiet():
        pipe = getattr(diffusers, cls_name).from_pretrained(
            folder, dtype=torch.float32, local_files_only=True
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def kontext_pipe(tiny_kontext):
    return _diffusers("FluxKontextPipeline", tiny_kontext)


@pytest.fixture(scope="module")
def fill_pipe(tiny_fill):
    return _diffusers("FluxFillPipeline", tiny_fill)


def reference(pipe, eps: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' image (uint8) and its denoised packed latents, for these arguments."""
    import torch

    common = dict(latents=torch.from_numpy(eps), max_sequence_length=512, **kwargs)
    with torch.no_grad():
        pixels = pipe(output_type="np", **common).images
        latents = pipe(output_type="latent", **common).images
    return to_uint8(pixels)[0], latents.float().numpy()


def ours(flux: Flux1, prompt: str, config: Config, eps: np.ndarray, **kwargs) -> tuple:
    """mflux's image and its denoised packed latents (the last step's)."""
    image = latents = None
    for event in flux.generate([0], prompt, config, latents=eps, **kwargs):
        if isinstance(event, StepEvent):
            latents = np.array(event.latents)
        elif isinstance(event, ImageEvent):
            image = event.image
    return image, latents


def gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# --- Kontext ----------------------------------------------------------------------------------------

H, W = 32, 48
REF = (64, 48)  # the reference's size (width, height): another than the output's, as usual


def kontext_case(pipe, eps, steps=3, guidance=2.5, **cfg):
    ref = init_image(REF[1], REF[0])
    config = Config(steps, H, W, guidance=guidance)
    want = reference(
        pipe, eps, image=ref, prompt=EDIT, height=H, width=W, num_inference_steps=steps,
        guidance_scale=guidance, _auto_resize=False, max_area=H * W, **cfg,
    )  # fmt: skip
    return ref, config, want


@pytest.mark.parametrize("true_cfg", [False, True])
def test_kontext_equals_diffusers(true_cfg, tiny_kontext, kontext_pipe):
    eps = noise(1, H, W, seed=13)
    cfg = dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0) if true_cfg else {}
    ref, config, (want, want_latents) = kontext_case(kontext_pipe, eps, **cfg)
    flux = Flux1.from_path(tiny_kontext, precision="float32")
    assert flux.variant == "kontext"  # from model_index.json's pipeline class: the shapes are dev's
    image, latents = ours(flux, EDIT, config, eps, image=ref, auto_resize=False, **cfg)
    d, g = diff(image.image, want), gap(latents, want_latents)
    print(f"kontext (true CFG {true_cfg}) vs diffusers: max |diff| {d}/255, latents {g:.1e}")
    assert d <= BOUND and g <= LATENT_BOUND
    _, plain = ours(flux, EDIT, config, eps, **cfg)  # no reference: text-to-image
    assert gap(plain, want_latents) > LATENT_GAP  # the reference tokens are what made it equal
    assert image.metadata["variant"] == "kontext" and image.metadata["reference_size"] == list(REF)


def _first_axis_zero(c):
    c.ids = mx.concatenate([mx.zeros_like(c.ids[..., :1]), c.ids[..., 1:]], axis=-1)


def _rows_and_columns_swapped(c):
    c.ids = c.ids[..., mx.array([0, 2, 1])]


def _reference_read_back(c):
    """The reference's tokens first, so that the target's slice of the output is read from them."""
    c.tokens_first = True


@pytest.mark.parametrize("breakage", [_first_axis_zero, _rows_and_columns_swapped, _reference_read_back])
def test_broken_kontext_conditioning_fails_the_comparison(breakage, tiny_kontext, kontext_pipe, monkeypatch):
    eps = noise(1, H, W, seed=13)
    ref, config, (_, want_latents) = kontext_case(kontext_pipe, eps, steps=2)
    prepare, model_input = engine.prepare_kontext, engine._model_input

    def broken_prepare(vae, reference, dtype):
        c = prepare(vae, reference, dtype)
        breakage(c)
        return c

    def broken_input(latents, c):
        x = model_input(latents, c)
        if getattr(c, "tokens_first", False):
            n = latents.shape[1]
            x = mx.concatenate([x[:, n:], x[:, :n]], axis=1)
        return x

    monkeypatch.setattr(engine, "prepare_kontext", broken_prepare)
    monkeypatch.setattr(engine, "_model_input", broken_input)
    flux = Flux1.from_path(tiny_kontext, precision="float32")
    _, latents = ours(flux, EDIT, config, eps, image=ref, auto_resize=False)
    assert gap(latents, want_latents) > LATENT_GAP


def test_kontext_with_a_lora_equals_diffusers_and_batches_and_previews(tiny_kontext, tmp_path):
    """A Kontext LoRA (diffusers' PEFT names) as FluxKontextPipeline.load_lora_weights applies it; a batch
    of two seeds equals each made alone; a preview at the last step is the image."""
    import torch
    from diffusers import FluxKontextPipeline

    from tests import lora_files as lf
    from tests.fixtures import _quiet

    rng = np.random.default_rng(1)
    shapes = lf.transformer_shapes(tiny_kontext)
    modules = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out", "x_embedder"]
    spec = {f"transformer.{m}": lf.pair(rng, 4, shapes[m][1], shapes[m][0], 0.5) for m in modules}
    lora = lf.save(tmp_path / "kontext_lora.safetensors", lf.peft(spec))
    eps = noise(1, H, W, seed=13)
    with _quiet():
        pipe = FluxKontextPipeline.from_pretrained(tiny_kontext, dtype=torch.float32, local_files_only=True)
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    ref, config, (_, want_latents) = kontext_case(pipe, eps, steps=2)
    flux = Flux1.from_path(tiny_kontext, precision="float32", lora_paths=[str(lora)])
    _, latents = ours(flux, EDIT, config, eps, image=ref, auto_resize=False)
    g = gap(latents, want_latents)
    print(f"kontext with a LoRA vs diffusers: latents {g:.1e}")
    assert g <= LATENT_BOUND
    _, plain = ours(
        Flux1.from_path(tiny_kontext, precision="float32"), EDIT, config, eps, image=ref, auto_resize=False
    )
    assert gap(plain, want_latents) > LATENT_GAP  # the LoRA is what made it equal

    kwargs = dict(image=ref, auto_resize=False)
    events = list(flux.generate([3, 4], EDIT, config, batch_size=2, previews=[2], **kwargs))
    batched = [e.image for e in events if isinstance(e, ImageEvent)]
    last = [e for e in events if isinstance(e, StepEvent) and e.step == 2][0].previews
    for seed, image, preview in zip([3, 4], batched, last):
        alone = flux.generate_image(seed, EDIT, config, **kwargs)
        assert diff(image.image, alone.image) <= 1 and diff(preview, image.image) == 0
    assert diff(batched[0].image, batched[1].image) > 0


def test_kontext_reference_snaps_to_the_preferred_resolutions():
    assert kontext_size(1024, 1024) == (1024, 1024)
    assert kontext_size(1920, 1080) == (1392, 752)  # 16:9: the nearest trained aspect ratio
    assert kontext_size(600, 1400) == (672, 1568)
    assert kontext_reference(init_image(100, 200)).size == (1456, 720)
    assert kontext_reference(init_image(100, 200), auto_resize=False).size == (192, 96)  # floored to 16


# --- Fill -------------------------------------------------------------------------------------------


def fill_case(pipe, image, mask, eps, h, w, steps=3, guidance=30.0):
    config = Config(steps, h, w, guidance=guidance)
    want = reference(
        pipe, eps, prompt=PROMPT, image=image, mask_image=mask, height=h, width=w,
        num_inference_steps=steps, guidance_scale=guidance,
    )  # fmt: skip
    return config, want


def test_fill_inpaint_equals_diffusers(tiny_fill, fill_pipe, posterior_mean):
    image, mask = init_image(H, W), mask_image(H, W)
    eps = noise(1, H, W, seed=17)
    config, (want, want_latents) = fill_case(fill_pipe, image, mask, eps, H, W)
    flux = Flux1.from_path(tiny_fill, precision="float32")
    assert flux.variant == "fill"
    got, latents = ours(flux, PROMPT, config, eps, image=image, mask_image=mask)
    d, g = diff(got.image, want), gap(latents, want_latents)
    print(f"fill inpaint vs diffusers: max |diff| {d}/255, latents {g:.1e}")
    assert d <= BOUND and g <= LATENT_BOUND
    assert got.metadata["strength"] == 1.0  # FluxFillPipeline's default


def test_fill_outpaint_equals_diffusers(tiny_fill, fill_pipe, posterior_mean):
    small, margins = init_image(32, 32), (16, 0, 0, 16)  # left, top, right, bottom
    h, w = 48, 48
    padded, border = expanded(small, margins)
    assert padded.size == (w, h)
    assert np.asarray(border)[:32, 16:].max() == 0 and np.asarray(border)[32:].min() == 255
    assert np.asarray(border)[:, :16].min() == 255
    eps = noise(1, h, w, seed=19)
    config, (want, want_latents) = fill_case(fill_pipe, padded, border, eps, h, w)
    flux = Flux1.from_path(tiny_fill, precision="float32")
    got, latents = ours(flux, PROMPT, config, eps, image=small, expand=margins)
    d, g = diff(got.image, want), gap(latents, want_latents)
    print(f"fill outpaint vs diffusers: max |diff| {d}/255, latents {g:.1e}")
    assert d <= BOUND and g <= LATENT_BOUND
    assert got.metadata["expand"] == list(margins)


def _mask_cells_column_major(mask):
    H, W = mask.shape
    m = mx.array(np.asarray(mask, dtype=np.float32)).reshape(1, H // 8, 8, W // 8, 8)
    return sampler.pack(m.transpose(0, 1, 3, 4, 2).reshape(1, H // 8, W // 8, 64))


@pytest.mark.parametrize("breakage", ["mask_packing", "channel_order", "no_mask"])
def test_broken_fill_conditioning_fails_the_comparison(
    breakage, tiny_fill, fill_pipe, posterior_mean, monkeypatch
):
    image, mask = init_image(H, W), mask_image(H, W)
    eps = noise(1, H, W, seed=17)
    config, (_, want_latents) = fill_case(fill_pipe, image, mask, eps, H, W, steps=2)
    if breakage == "mask_packing":  # each 8x8 cell read column-major
        monkeypatch.setattr(engine, "pack_mask", _mask_cells_column_major)
    else:
        prepare = engine.prepare_fill

        def broken(vae, image, mask, dtype):
            c = prepare(vae, image, mask, dtype)
            if breakage == "channel_order":  # the mask before the masked image's latents
                c.channels = mx.concatenate([c.channels[..., 64:], c.channels[..., :64]], axis=-1)
            else:
                c.channels = mx.concatenate([c.channels[..., :64], mx.zeros_like(c.channels[..., 64:])], -1)
            return c

        monkeypatch.setattr(engine, "prepare_fill", broken)
    flux = Flux1.from_path(tiny_fill, precision="float32")
    _, latents = ours(flux, PROMPT, config, eps, image=image, mask_image=mask)
    assert gap(latents, want_latents) > LATENT_GAP


# --- what a variant refuses ---------------------------------------------------------------------------


def test_variant_arguments_are_refused_before_any_load(tiny_kontext, tiny_fill, tiny_dev):
    kontext = Flux1.from_path(tiny_kontext, precision="float32")
    fill = Flux1.from_path(tiny_fill, precision="float32")
    dev = Flux1.from_path(tiny_dev, precision="float32")
    image, mask = init_image(32, 32), mask_image(32, 32)
    cases = [
        (
            kontext,
            dict(image=image, mask_image=mask),
            "kontext takes no mask_image yet; a fill model inpaints",
        ),
        (kontext, dict(image=image, strength=0.5), "kontext takes no strength"),
        (fill, dict(image=image), "give both"),
        (fill, dict(image=image, mask_image=Image.new("L", (32, 32))), "the mask is all black"),
        (fill, dict(image=image, mask_image=mask_image(16, 32)), "give a mask of the image's size"),
        (fill, dict(image=image, mask_image=mask, expand=(16, 0, 0, 0)), "not both"),
        (fill, dict(image=image, expand=(10, 0, 0, 0)), "each a multiple of 16"),
        (fill, dict(image=image, expand=(4096, 0, 0, 0)), "above the limits"),
        (dev, dict(image=image, expand=(16, 0, 0, 0)), "outpaints with a fill model"),
    ]
    for flux, kwargs, words in cases:
        with pytest.raises(InvalidArgument, match=words):
            flux.generate_image(0, PROMPT, Config(1, 32, 32), **kwargs)
        assert not flux.models.modules, f"{kwargs} loaded modules before refusing"


# --- the command line ---------------------------------------------------------------------------------


def _cli(*args, cwd):
    from click.testing import CliRunner

    from mflux.cli import cli
    from tests.test_run import inside

    with inside(cwd):
        return CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)


def _meta(path) -> dict:
    import json

    return json.loads(Image.open(path).text["mflux"])


def test_cli_fill_inpaints_outpaints_and_replays_exactly(tiny_fill, tmp_path):
    init_image(32, 48).save(tmp_path / "photo.png")
    mask_image(32, 48).save(tmp_path / "mask.png")
    common = ["--path", str(tiny_fill), "--steps", "2", "--seed", "3", "--prompt", PROMPT]
    made = _cli(*common, "--image", "photo.png", "--mask", "mask.png", "-o", "in.png", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    m = _meta(tmp_path / "in.png")
    assert (m["variant"], m["strength"], m["guidance"]) == ("fill", 1.0, 30.0)  # Fill's defaults
    assert len(m["mask_sha256"]) == 64 and Image.open(tmp_path / "in.png").text["Variant"] == "fill"
    out = _cli(*common, "--image", "photo.png", "--expand", "16,0,0,16", "-o", "out.png", cwd=tmp_path)
    assert out.exit_code == 0, out.output
    assert Image.open(tmp_path / "out.png").size == (64, 48)  # the image and its new border
    assert _meta(tmp_path / "out.png")["expand"] == [16, 0, 0, 16]
    assert Image.open(tmp_path / "out.png").text["Expand"] == "16,0,0,16"
    for name in ("in.png", "out.png"):
        again = _cli("--path", str(tiny_fill), "--from", name, "-o", f"again-{name}", cwd=tmp_path)
        assert again.exit_code == 0, again.output
        assert np.array_equal(
            np.array(Image.open(tmp_path / name)), np.array(Image.open(tmp_path / f"again-{name}"))
        )


def test_cli_kontext_edits_and_replays_exactly(tiny_kontext, tmp_path, monkeypatch):
    # Kontext's trained resolutions are all about 1 megapixel, slow for a test: two small ones stand in
    monkeypatch.setattr("mflux.flux1.KONTEXT_RESOLUTIONS", [(80, 64), (64, 80)])
    init_image(48, 64).save(tmp_path / "photo.png")
    args = ["--path", str(tiny_kontext), "--steps", "2", "--seed", "4", "--width", "48", "--height", "32"]
    made = _cli(*args, "--image", "photo.png", "--prompt", EDIT, "-o", "edit.png", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    m = _meta(tmp_path / "edit.png")
    assert (m["variant"], m["guidance"], m["reference_size"]) == ("kontext", 2.5, [80, 64])  # the nearest
    assert "strength" not in m and len(m["image_sha256"]) == 64
    again = _cli("--path", str(tiny_kontext), "--from", "edit.png", "-o", "again.png", cwd=tmp_path)
    assert again.exit_code == 0, again.output
    assert np.array_equal(
        np.array(Image.open(tmp_path / "edit.png")), np.array(Image.open(tmp_path / "again.png"))
    )


def test_kontext_without_a_size_takes_the_reference_aspect_at_a_trained_resolution(tmp_path):
    from mflux.run import plan

    init_image(90, 160).save(tmp_path / "wide.png")  # 16:9
    values = {"prompt": EDIT, "image": str(tmp_path / "wide.png"), "seeds": [1]}
    s = plan(values, set(values), output=str(tmp_path / "a.png"), variant="kontext").generations[0]
    assert (s.width, s.height) == (1392, 752) and s.strength is None
    assert any("Kontext resolution nearest" in n for n in s.notes)
    s = plan(
        {**values, "width": 512}, set(values) | {"width"}, output=str(tmp_path / "a.png"), variant="kontext"
    )
    assert (s.generations[0].width, s.generations[0].height) == (512, 288)  # one side: the image's aspect
    s = plan(values, set(values), output=str(tmp_path / "a.png"), variant="dev").generations[0]
    assert (s.width, s.height, s.strength) == (160, 80, 0.6)  # img2img: the image's own size


@pytest.mark.parametrize(
    "variant, extra, words",
    [
        (
            "kontext",
            ["--image", "photo.png", "--mask", "mask.png"],
            "kontext takes no --mask yet; -m fill inpaints",
        ),
        ("kontext", ["--image", "photo.png", "--strength", "0.5"], "kontext takes no --strength"),
        (
            "kontext",
            ["--image", "photo.png", "--expand", "0,0,16,0"],
            "outpaints with the fill model (-m fill)",
        ),
        ("fill", ["--image", "photo.png"], "fill repaints what --mask marks white"),
        ("fill", ["--mask", "mask.png"], "give --image with --mask"),
        ("fill", ["--image", "photo.png", "--mask", "black.png"], "is all black: nothing to repaint"),
        (
            "fill",
            ["--image", "photo.png", "--mask", "small.png"],
            "is 16x16 but the image photo.png is 48x32",
        ),
        ("fill", ["--image", "photo.png", "--mask", "notes.png"], "not an image PIL can read"),
        ("fill", ["--image", "photo.png", "--mask", "mask.png", "--expand", "16,0,0,0"], "not both"),
        ("fill", ["--image", "photo.png", "--expand", "8,0,0,0"], "each a multiple of 16"),
        ("fill", ["--image", "photo.png", "--expand", "0,0,4096,0"], "above the limits"),
        ("dev", ["--image", "photo.png", "--expand", "16,0,0,0"], "dev can't"),
    ],
)
def test_cli_refuses_what_a_variant_cannot_use_before_any_load(
    variant, extra, words, tmp_path, monkeypatch, tiny_kontext, tiny_fill, tiny_dev
):
    import mflux.flux1

    folder = {"kontext": tiny_kontext, "fill": tiny_fill, "dev": tiny_dev}[variant]
    init_image(32, 48).save(tmp_path / "photo.png")
    mask_image(32, 48).save(tmp_path / "mask.png")
    Image.new("L", (48, 32)).save(tmp_path / "black.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
    (tmp_path / "notes.png").write_text("not an image")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was opened before the settings were refused")

    monkeypatch.setattr(mflux.flux1.Flux1, "__init__", no_load)
    result = _cli("--path", str(folder), "--prompt", PROMPT, "--steps", "1", *extra, cwd=tmp_path)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output
