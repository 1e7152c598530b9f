"""mflux.metadata: the new settings in mflux's tags, the JSON sidecar and the A1111 text, read back by a
third-party reader (sd-parsers) and by `--from`."""

import io
import json

import numpy as np
from PIL import Image
from sd_parsers import ParserManager

from mflux import metadata, settings
from mflux.flux1 import GeneratedImage

META = {
    "prompt": "a lighthouse at dusk, oil on canvas",
    "negative_prompt": "blurry, low quality",
    "true_cfg_scale": 4.0,
    "model": "dev-q8",
    "variant": "dev",
    "seed": 18446744073709551615,
    "steps": 20,
    "guidance": 3.5,
    "height": 64,
    "width": 96,
    "strength": 0.65,
    "image_path": "/data/init.png",
    "image_sha256": "ab" * 32,
    "mask_path": "/data/mask.png",
    "mask_sha256": "cd" * 32,
    "prompt_file_line": "prompts.jsonl:3",
    "precision": "float32",
    "quantization": "8-bit affine (group size 64, at load time)",
    "lora_paths": ["style.safetensors"],
    "lora_scales": [0.5],
    "timings": {"denoising": 1.25},
}


def image() -> Image.Image:
    return Image.fromarray(np.arange(64 * 96 * 3, dtype=np.uint8).reshape(64, 96, 3))


def test_a1111_text_reads_back_with_sd_parsers(tmp_path):
    path = metadata.save_png(image(), tmp_path / "x.png", META, export_json=False, overwrite=False)
    info = ParserManager().parse(str(path))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    assert info.full_prompt == META["prompt"]
    assert info.full_negative_prompt == META["negative_prompt"]
    sampler = info.samplers[0]
    assert sampler.name == "Euler" and sampler.model.name == "dev-q8"
    p = sampler.parameters
    assert (p["steps"], p["seed"], p["cfg_scale"]) == ("20", str(META["seed"]), "4.0")
    assert info.metadata["Distilled CFG Scale"] == "3.5"
    assert info.metadata["Denoising strength"] == "0.65"
    assert info.metadata["Size"] == "96x64"


def test_without_true_cfg_the_cfg_scale_is_1(tmp_path):
    m = {k: v for k, v in META.items() if k not in ("negative_prompt", "true_cfg_scale", "strength")}
    path = metadata.save_png(image(), tmp_path / "x.png", m, export_json=False, overwrite=False)
    info = ParserManager().parse(str(path))
    assert info.samplers[0].parameters["cfg_scale"] == "1" and info.full_negative_prompt == ""
    text = Image.open(path).text["parameters"]
    assert "Negative prompt:" not in text and "Denoising strength" not in text


def test_a1111_quotes_values_with_commas_as_a1111_does(tmp_path):
    text = metadata.a1111_parameters(metadata.full_metadata(META))
    assert 'Quantization: "8-bit affine (group size 64, at load time)"' in text
    assert 'LoRAs: "style.safetensors:0.5"' in text
    a = settings.parse_a1111(text)
    assert a["Quantization"] == META["quantization"] and a["LoRAs"] == "style.safetensors:0.5"


def test_new_settings_in_the_tags_and_the_sidecar(tmp_path):
    path = metadata.save_png(image(), tmp_path / "x.png", META, export_json=True, overwrite=False)
    tags = Image.open(path).text
    assert tags["NegativePrompt"] == META["negative_prompt"] and tags["TrueCFG"] == "4.0"
    assert tags["Strength"] == "0.65" and tags["PromptFileLine"] == "prompts.jsonl:3"
    assert (tags["InitImage"], tags["InitImageSHA256"]) == ("/data/init.png", "ab" * 32)
    assert (tags["Mask"], tags["MaskSHA256"]) == ("/data/mask.png", "cd" * 32)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == json.loads(tags["mflux"])
    for key in (
        "negative_prompt",
        "true_cfg_scale",
        "strength",
        "image_sha256",
        "mask_sha256",
        "prompt_file_line",
    ):
        assert sidecar[key] == META[key]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_png_bytes_carry_the_same_image_and_metadata(tmp_path):
    path = metadata.save_png(image(), tmp_path / "x.png", META, export_json=False, overwrite=False)
    data = GeneratedImage(image(), META).png_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from_bytes, from_file = Image.open(io.BytesIO(data)), Image.open(path)
    assert np.array_equal(np.array(from_bytes), np.array(image()))
    assert from_bytes.text == from_file.text


def test_every_written_setting_is_recalled(tmp_path):
    m = {k: v for k, v in META.items() if not k.startswith(("image", "mask"))}
    m["seed"] = 7
    path = metadata.save_png(image(), tmp_path / "x.png", m, export_json=False, overwrite=False)
    mflux_own = settings.read_image_settings(path).values
    Image.open(path).save(tmp_path / "a1111.png", pnginfo=_only_parameters(path))
    a1111 = settings.read_image_settings(tmp_path / "a1111.png")
    assert a1111.source == "A1111 parameters"
    for key in ("prompt", "negative_prompt", "seeds", "steps", "width", "height", "guidance", "true_cfg"):
        assert a1111.values[key] == mflux_own[key], key
    assert a1111.values["strength"] == 0.65


def _only_parameters(path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", Image.open(path).text["parameters"])
    return info
