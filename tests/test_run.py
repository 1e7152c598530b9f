"""`mflux run` and the Python API on the tiny checkpoints, through the store and through --path."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mflux import Config, Flux1
from mflux.cli import cli
from mflux.errors import InvalidArgument, MfluxError
from tests.fixtures import store_hf_folder

PROMPT = "Luxury food photograph"


@contextmanager
def inside(folder: Path):
    old = os.getcwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(old)


def invoke(*args, cwd: Path):
    """Run the CLI in a fresh folder under `cwd`; returns the result and what it wrote there."""
    with inside(cwd / "out") as out:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        files = sorted(p.name for p in out.iterdir())
        images = {p.name: np.array(Image.open(p)) for p in out.glob("*.png")}
        texts = {p.name: p.read_text() for p in out.glob("*.json")}
    return result, files, images, texts


def test_api_exactly_as_documented(tiny_schnell, tmp_path, monkeypatch):
    store_hf_folder(tiny_schnell, "schnell")
    monkeypatch.chdir(tmp_path)
    flux = Flux1.from_name("schnell")
    same = Flux1.from_alias(alias="schnell")
    flux = Flux1.from_path(
        str(tiny_schnell), precision="float32", quantize=None, lora_paths=None, lora_scales=None
    )
    image = flux.generate_image(
        seed=2,
        prompt=PROMPT,
        config=Config(num_inference_steps=2, height=64, width=64, guidance=3.5),
        latents=None,
    )
    assert isinstance(image.image, Image.Image) and image.image.size == (64, 64)
    image.save("image.png", export_json_metadata=False)
    assert Image.open("image.png").text["Prompt"] == PROMPT
    assert not Path("image.json").exists()
    # the store model and its alias are the same weights: same seed, same image
    again = same.generate_image(
        seed=2, prompt=PROMPT, config=Config(num_inference_steps=2, height=64, width=64)
    )
    assert np.array_equal(np.array(again.image), np.array(image.image))


def test_max_sequence_length_defaults_per_variant(tiny_schnell, tiny_dev):
    assert Flux1.from_path(tiny_schnell).folder.defaults["max_sequence_length"] == 256
    assert Flux1.from_path(tiny_dev).folder.defaults["max_sequence_length"] == 512


def test_name_with_bits_quantizes_a_stored_base_at_load_time(tiny_schnell):
    store_hf_folder(tiny_schnell, "schnell")
    flux = Flux1.from_name("schnell-q8")
    assert flux.quantize.bits == 8 and flux.model_name == "schnell-q8"
    flux.load()
    blocks = flux.models.modules["transformer"].double_blocks[0]
    assert type(blocks.img_attn.qkv).__name__ == "QuantizedLinear"


def test_missing_model_names_mflux_pull():
    with pytest.raises(MfluxError, match="mflux pull dev"):
        Flux1.from_name("dev")
    with pytest.raises(MfluxError, match="did you mean"):
        Flux1.from_name("shnell")


def test_run_writes_one_png_per_seed_with_metadata(tiny_schnell, tmp_path):
    store_hf_folder(tiny_schnell, "schnell")
    args = ["run", "-m", "schnell", "--prompt", PROMPT, "--height", "64", "--width", "48", "--steps", "2"]
    result, files, images, texts = invoke(
        *args, "--seed", "1", "2", "--seed", "3", "--metadata", cwd=tmp_path
    )
    assert result.exit_code == 0, result.output
    assert files == [f"image_seed_{s}.{ext}" for s in (1, 2, 3) for ext in ("json", "png")]
    assert not np.array_equal(images["image_seed_1.png"], images["image_seed_2.png"])
    meta = json.loads(texts["image_seed_2.json"])
    assert (meta["seed"], meta["steps"], meta["size"], meta["model"]) == (2, 2, "48x64", "schnell")


def test_run_never_overwrites(tiny_schnell, tmp_path):
    args = ["run", "--path", str(tiny_schnell), "--prompt", PROMPT, "--height", "32", "--width", "32"]
    with inside(tmp_path / "out"):
        Path("image.png").write_bytes(b"precious")
        result = CliRunner().invoke(cli, [*args, "--steps", "1", "--seed", "4"])
        assert result.exit_code == 0, result.output
        assert "wrote image_1.png" in result.output
        assert Path("image.png").read_bytes() == b"precious"


def test_png_metadata_reads_back_with_exiftool(tiny_dev, tmp_path):
    exiftool = shutil.which("exiftool")
    assert exiftool, "exiftool is needed (Debian: libimage-exiftool-perl; .ci/run installs it)"
    args = ["run", "--path", str(tiny_dev), "--prompt", PROMPT, "--height", "32", "--width", "32"]
    result, _, _, _ = invoke(
        *args, "--steps", "2", "--seed", "7", "--guidance", "4.5", "-q", "8", cwd=tmp_path
    )
    assert result.exit_code == 0, result.output
    png = next(tmp_path.rglob("image.png"))
    tags = json.loads(
        subprocess.run([exiftool, "-j", str(png)], capture_output=True, text=True, check=True).stdout
    )[0]
    assert tags["Prompt"] == PROMPT
    assert (tags["Seed"], tags["Steps"], tags["Guidance"], tags["Size"]) == (7, 2, 4.5, "32x32")
    assert tags["Model"] == "tiny_dev-q8" or tags["Model"].endswith("-q8")
    assert "8-bit" in tags["Quantization"]
    assert tags["Software"].startswith("mflux ")
    assert float(tags["DenoisingSeconds"]) > 0
    # the AUTOMATIC1111 `parameters` chunk: the prompt, then one line of `Key: value` pairs
    prompt_line, params = Image.open(png).text["parameters"].split("\n")
    assert prompt_line == PROMPT
    assert params.startswith("Steps: 2, Sampler: Euler, ") and "Seed: 7" in params and "Size: 32x32" in params


def test_guidance_on_schnell_warns(tiny_schnell, tmp_path):
    args = ["run", "--path", str(tiny_schnell), "--prompt", PROMPT, "--height", "32", "--width", "32"]
    result, _, _, _ = invoke(*args, "--steps", "1", "--guidance", "5", cwd=tmp_path)
    assert result.exit_code == 0
    assert "--guidance applies to dev only" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "30"], "multiple of 16"),
        (["--width", "0"], "multiple of 16"),
        (["--steps", "0"], "--steps"),
        (["-q", "7"], "-q/--quantize must be one of 3, 4, 5, 6, 8, got '7'"),
    ],
)
def test_bad_flags_get_one_line(extra, message, tiny_schnell, tmp_path):
    args = ["run", "--path", str(tiny_schnell), "--prompt", PROMPT, *extra]
    result, files, _, _ = invoke(*args, cwd=tmp_path)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert files == []


def test_not_a_flux_folder_names_the_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    result, _, _, _ = invoke("run", "--path", str(tmp_path / "empty"), "--prompt", PROMPT, cwd=tmp_path)
    assert result.exit_code == 1
    assert "missing transformer/config.json" in result.output


def test_missing_weights_name_the_missing_tensor(tiny_schnell, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_schnell, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    result, _, _, _ = invoke(
        "run", "--path", str(broken), "--prompt", PROMPT, "--height", "32", "--width", "32", cwd=tmp_path
    )
    assert result.exit_code == 1
    assert "no .safetensors weights" in result.output


def test_unknown_model_and_no_pull_in_a_real_process(tmp_path):
    env = {
        "MFLUX_HOME": str(tmp_path / "home"),
        "PATH": str(Path(sys.executable).parent),
        "HF_HUB_OFFLINE": "1",
    }
    for model, message in [("shnell", "did you mean 'schnell'"), ("dev", "--no-pull")]:
        cmd = [sys.executable, "-m", "mflux", "run", "-m", model, "--prompt", PROMPT, "--no-pull"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_freeing_modulation_weights_keeps_images_identical(tiny_dev):
    config = Config(num_inference_steps=2, height=32, width=48, guidance=4.0)
    kept = Flux1.from_path(tiny_dev, precision="float32")
    lean = Flux1.from_path(tiny_dev, precision="float32")
    for seed, prompt in [(1, PROMPT), (2, PROMPT), (1, "a red bicycle")]:
        want = np.array(kept.generate_image(seed, prompt, config).image)
        got = np.array(lean.generate_image(seed, prompt, config, free_modulation_weights=True).image)
        assert np.array_equal(want, got), (seed, prompt)
        assert "time_in" not in lean.models.modules["transformer"]  # freed again after each generation
    assert "time_in" in kept.models.modules["transformer"]


def test_a_batch_equals_its_images_made_alone(tiny_dev):
    """Four seeds denoised as one batch give the four single images (float32, within 1/255)."""
    flux = Flux1.from_path(tiny_dev, precision="float32")
    config = Config(num_inference_steps=2, height=32, width=48, guidance=4.0)
    seeds = [3, 1, 4, 1 + 2**63]
    batched = flux.generate_images(seeds, PROMPT, config, batch_size=4)
    assert [im.metadata["seed"] for im in batched] == seeds
    for seed, image in zip(seeds, batched):
        alone = np.array(flux.generate_image(seed, PROMPT, config).image).astype(int)
        assert np.abs(np.array(image.image).astype(int) - alone).max() <= 1, seed
    assert not np.array_equal(np.array(batched[0].image), np.array(batched[1].image))


def test_generate_streams_one_event_per_step(tiny_schnell):
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    config = Config(num_inference_steps=3, height=32, width=32)
    events = list(flux.generate([5, 6, 7], PROMPT, config, batch_size=2, previews=[2]))
    kinds = [(type(e).__name__, getattr(e, "step", None), getattr(e, "indices", None)) for e in events]
    assert kinds == [
        ("StepEvent", 1, [0, 1]), ("StepEvent", 2, [0, 1]), ("StepEvent", 3, [0, 1]),
        ("ImageEvent", None, None), ("ImageEvent", None, None),
        ("StepEvent", 1, [2]), ("StepEvent", 2, [2]), ("StepEvent", 3, [2]),
        ("ImageEvent", None, None),
    ]  # fmt: skip
    previews = [e.previews for e in events if type(e).__name__ == "StepEvent"]
    assert [p is not None for p in previews] == [False, True, False] * 2
    assert previews[1][0].size == (32, 32) and len(previews[1]) == 2
    # the last step's latents decoded are the image itself
    last = list(flux.generate([7], PROMPT, config, previews=True))
    assert np.array_equal(np.array(last[2].previews[0]), np.array(last[3].image.image))


def test_stopping_the_iteration_stops_the_work(tiny_schnell):
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    events = flux.generate([1, 2], PROMPT, Config(num_inference_steps=4, height=32, width=32))
    first = next(events)
    assert first.step == 1
    events.close()  # a cancelled job: nothing further runs
    assert list(events) == []


def test_seed_range_is_checked_before_anything_loads(tiny_schnell):
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    for bad in (-1, 2**64, 1.5, "3"):
        with pytest.raises(InvalidArgument, match=r"0\.\.18446744073709551615"):
            flux.generate_image(bad, PROMPT, Config(num_inference_steps=1, height=32, width=32))
    assert flux.models.modules == {}


def test_save_never_overwrites_unless_asked(tiny_schnell, tmp_path):
    image = Flux1.from_path(tiny_schnell, precision="float32").generate_image(
        1, PROMPT, Config(num_inference_steps=1, height=32, width=32)
    )
    first = image.save(tmp_path / "a.png")
    second = image.save(tmp_path / "a.png")
    assert (first.name, second.name) == ("a.png", "a_1.png")
    assert image.save(tmp_path / "a.png", overwrite=True).name == "a.png"
    assert Image.open(io.BytesIO(image.png_bytes())).text["Prompt"] == PROMPT


def test_a_bits_suffix_mflux_cannot_make_is_refused_before_any_suggestion(tiny_schnell, tmp_path):
    store_hf_folder(tiny_schnell, "tiny")
    result = CliRunner().invoke(cli, ["run", "-m", "tiny-q7", "--prompt", PROMPT, "--no-pull"])
    assert result.exit_code != 0
    assert "7-bit is not a quantization mflux makes" in result.output
    assert "mflux quantize tiny --bits 7" not in result.output
    with pytest.raises(InvalidArgument, match="7-bit"):
        Flux1.from_name("tiny-q7")


def test_a_model_removed_while_in_use_is_named(tiny_schnell):
    stored = store_hf_folder(tiny_schnell, "gone")
    flux = Flux1.from_name("gone")
    shutil.rmtree(stored)  # what `mflux rm gone` does while this process runs
    with pytest.raises(MfluxError, match="gone was removed while in use"):
        flux.generate_image(1, PROMPT, Config(num_inference_steps=1, height=32, width=32))


def test_damaged_store_files_are_caught_when_the_model_opens(tiny_schnell):
    stored = store_hf_folder(tiny_schnell, "dmg")
    vae = stored / "vae" / "diffusion_pytorch_model.safetensors"
    Flux1.from_name("dmg")  # intact: opens
    before = vae.stat()
    data = bytearray(vae.read_bytes())
    data[-1] ^= 0xFF  # a flipped byte, same size
    vae.write_bytes(bytes(data))
    later = time.time() + 60
    os.utime(vae, (later, later))  # as if edited a minute after it was stored
    with pytest.raises(MfluxError, match="is damaged: vae/.* does not match its sha256.*mflux inspect dmg"):
        Flux1.from_name("dmg")
    os.utime(vae, ns=(before.st_atime_ns, before.st_mtime_ns))  # the cheap check can't see this one
    Flux1.from_name("dmg")
    with pytest.raises(MfluxError, match="does not match its sha256"):
        Flux1.from_name("dmg", verify=True)
    result = CliRunner().invoke(cli, ["run", "-m", "dmg", "--prompt", PROMPT, "--verify", "--no-pull"])
    assert result.exit_code != 0 and "does not match its sha256" in result.output
    vae.write_bytes(bytes(data[:-10]))
    with pytest.raises(MfluxError, match="is damaged: vae/diffusion_pytorch_model.safetensors is .* bytes"):
        Flux1.from_name("dmg")
    vae.unlink()
    with pytest.raises(MfluxError, match="is missing .*mflux inspect dmg --verify"):
        Flux1.from_name("dmg")


def test_the_api_refuses_negative_guidance():
    # as `run --guidance -5` does (tests/test_faults.py): the server's requests reach Config too
    with pytest.raises(InvalidArgument, match="guidance must be a finite number, 0 or more, got -5"):
        Config(1, 32, 32, guidance=-5.0)
    assert Config(1, 32, 32, guidance=0.0).guidance == 0.0
