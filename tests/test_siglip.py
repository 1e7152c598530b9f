"""Redux's image encoder (SigLIP's vision tower) and embedder in the MLX runtime, against transformers'
SiglipVisionModel with its SiglipImageProcessor (the PIL fallback) and diffusers' ReduxImageEncoder,
on the tiny FLUX.1-Redux-dev folders (tests/fixtures.py)."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mflux.errors import MfluxError
from mflux.runtime import loader, siglip
from tests.fixtures import REDUX_FILES, _quiet

TOLERANCE = 1e-4  # max|Δ| / max|ref|, float32


def photo(size=(80, 60), mode="RGB", seed=0) -> Image.Image:
    """A random image of `size` (width, height): not square, so the resize matters."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)


IMAGES = {
    "rgb": lambda: photo(),
    "rgba": lambda: photo(mode="RGBA", seed=1),  # transparency composited onto white
    "grey": lambda: photo(seed=2).convert("L"),
    "exact size": lambda: photo(size=(56, 56), seed=3),  # no resize
}


def relative_error(ours, ref) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(ours, dtype=np.float64) - ref).max() / np.abs(ref).max())


def reference_pipeline(folder: Path):
    import torch
    from diffusers import FluxPriorReduxPipeline

    with _quiet():
        return FluxPriorReduxPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


@pytest.fixture(scope="module")
def reference(tiny_redux):
    return reference_pipeline(tiny_redux)


@pytest.fixture(scope="module")
def redux(tiny_redux):
    return loader.load_redux(tiny_redux, mx.float32)


def test_fixture_has_the_real_repo_files_and_prefixed_keys(tiny_redux, tiny_redux_unprefixed):
    assert sorted(str(p.relative_to(tiny_redux)) for p in tiny_redux.rglob("*") if p.is_file()) == REDUX_FILES
    prefixed = mx.load(str(tiny_redux / "image_encoder/model.safetensors"))
    assert all(k.startswith("vision_model.") for k in prefixed)
    assert any(k.startswith("vision_model.head.") for k in prefixed)  # the pooling head the loader drops
    unprefixed = mx.load(str(tiny_redux_unprefixed / "image_encoder/model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in unprefixed)


def test_the_reference_loads_every_fixture_weight(tiny_redux):
    import torch
    from transformers import SiglipVisionModel

    _, info = SiglipVisionModel.from_pretrained(
        tiny_redux / "image_encoder", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("kind", IMAGES)
def test_last_hidden_state_equals_transformers(kind, redux, reference):
    import torch

    image = IMAGES[kind]()
    pixels = reference.feature_extractor.preprocess(
        images=image, do_resize=True, return_tensors="pt", do_convert_rgb=True
    ).pixel_values  # (1, C, H, W), as FluxPriorReduxPipeline.encode_image makes it
    ours = siglip.pixel_values(image, redux.processing)  # (H, W, C)
    np.testing.assert_array_equal(ours, pixels[0].numpy().transpose(1, 2, 0))
    with torch.no_grad():
        ref = reference.image_encoder(pixel_values=pixels).last_hidden_state.numpy()
    out = redux.image_encoder(mx.array(ours[None]))
    assert out.shape == ref.shape == (1, 16, 32)
    assert relative_error(out, ref) <= TOLERANCE


def test_both_key_layouts_load_the_same_weights(redux, tiny_redux_unprefixed):
    unprefixed = loader.load_redux(tiny_redux_unprefixed, mx.float32)
    pixels = mx.array(siglip.pixel_values(photo(), redux.processing)[None])
    np.testing.assert_array_equal(
        np.asarray(unprefixed.image_encoder(pixels)), np.asarray(redux.image_encoder(pixels))
    )


def test_redux_embedder_equals_diffusers(redux, reference):
    import torch

    x = np.random.default_rng(4).standard_normal((2, 16, 32), dtype=np.float32)
    with torch.no_grad():
        ref = reference.image_embedder(torch.from_numpy(x)).image_embeds.numpy()
    out = redux.image_embedder(mx.array(x))
    assert out.shape == ref.shape == (2, 16, 64)
    assert relative_error(out, ref) <= TOLERANCE


def test_redux_image_tokens_equal_diffusers_encode_image(redux, reference):
    import torch

    images = [photo(seed=5), photo(size=(40, 72), seed=6)]
    with torch.no_grad():
        ref = reference.image_embedder(reference.encode_image(images, "cpu", 1)).image_embeds.numpy()
    out = redux(images)
    assert out.shape == ref.shape == (2, 16, 64)
    assert relative_error(out, ref) <= TOLERANCE


def test_the_runtime_path_imports_neither_transformers_nor_torch(tiny_redux):
    code = (
        "import sys, mlx.core as mx; from PIL import Image; from mflux.runtime import loader\n"
        f"redux = loader.load_redux({str(tiny_redux)!r}, mx.float32)\n"
        "mx.eval(redux([Image.new('RGB', (30, 20), (10, 200, 30))]))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_folder_without_the_encoder_config_is_refused(tmp_path, tiny_redux):
    folder = tmp_path / "redux"
    folder.mkdir()
    for rel in ("image_embedder/config.json", "feature_extractor/preprocessor_config.json"):
        (folder / rel).parent.mkdir()
        (folder / rel).write_text((tiny_redux / rel).read_text())
    with pytest.raises(MfluxError, match="missing image_encoder/config.json"):
        loader.load_redux(folder, mx.float32)


def test_a_preprocessor_size_the_encoder_does_not_take_is_refused(tmp_path, tiny_redux):
    import shutil

    folder = shutil.copytree(tiny_redux, tmp_path / "redux")
    config = folder / "feature_extractor/preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "size": {"height": 84, "width": 84}}))
    with pytest.raises(MfluxError, match="resizes to 84x84, but the image encoder takes 56x56"):
        loader.load_redux(folder, mx.float32)


def test_pixels_of_another_size_are_refused(redux):
    with pytest.raises(MfluxError, match="SigLIP takes 56x56 images, got 70x56"):
        redux.image_encoder(mx.zeros((1, 56, 70, 3)))
