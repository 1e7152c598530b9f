"""`mflux run`'s generation features on the tiny checkpoints: every bad input refused before the model is
resolved, `--from` replaying an image exactly, prompt files against the single-image path, step
previews against the final image, and the summary."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

import mflux.run
from mflux import Config, Flux1
from mflux.cli import cli
from tests import lora_files
from tests.fixtures import store_hf_folder
from tests.test_run import PROMPT, inside

SMALL = ["--height", "32", "--width", "32", "--steps", "2"]


def invoke(*args, cwd: Path):
    with inside(cwd):
        return CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)


def pixels(path) -> np.ndarray:
    return np.array(Image.open(path))


def write_png(path: Path, size=(32, 32), color=(180, 40, 40), text: dict | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    rng = np.random.default_rng(sum(color))
    noise = rng.integers(0, 60, (size[1], size[0], 3))
    Image.fromarray((np.array(color) * 0.7 + noise).astype(np.uint8)).save(path, pnginfo=info)
    return path


@pytest.fixture
def files(tmp_path) -> Path:
    """A folder with an init image, a mask, a mask of the wrong size, a non-image and a bad prompt file."""
    d = tmp_path / "in"
    d.mkdir()
    write_png(d / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255  # repaint the right half
    Image.fromarray(mask).save(d / "mask.png")
    Image.new("L", (16, 16), 255).save(d / "small.png")
    write_png(d / "plain.png")
    (d / "notes.png").write_text("not an image")
    (d / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "a", "seed": -4}\n')
    (d / "taken").write_text("")
    return d


BAD = [
    (["--seed", "-1"], "seed -1 is out of range"),
    (["--seed", str(2**64)], "0 to 2**64-1"),
    (["--width", "4112"], "--width 4112 is above the limit of 4096"),
    (["--height", "30"], "--height must be a positive multiple of 16"),
    (["--width", "2048", "--height", "4096"], "8,388,608 pixels, above the limit of 4,194,304"),
    (["--steps", "0"], "--steps must be a whole number of at least 1"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--true-cfg", "3"], "--true-cfg needs --negative-prompt"),
    (["--negative-prompt", "blurry", "--true-cfg", "1"], "diffusers would ignore the negative prompt"),
    (["--negative-prompt", "blurry", "--true-cfg", "inf"], "--true-cfg must be a finite number"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--image", "{d}/missing.png"], "missing.png: no such file"),
    (["--image", "{d}/notes.png"], "notes.png: not an image"),
    (["--mask", "{d}/mask.png"], "--mask needs --image"),
    (["--image", "{d}/init.png", "--mask", "{d}/small.png"], "is 16x16 but the image"),
    (["--image", "{d}/init.png", "--strength", "0"], "--strength must be in (0, 1]"),
    (["--image", "{d}/init.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--prompt", "x" * 100_000], "100,000 characters"),
    (["--lora-paths", "{d}/none.safetensors"], "none.safetensors: no such file"),
    (["--lora-paths", "{d}/notes.png"], "not a valid safetensors file"),
    (["--output", "out.jpg"], "use a name ending in .png"),
    (["--output", "{d}/taken/x.png"], "is a file, not a folder"),
    (["--seed", "1", "-n", "2"], "give --seed or -n, not both"),
    (["-n", "0"], "-n must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--stepwise", "{d}/taken"], "is a file; give a folder"),
    (["--stepwise-every", "2"], "--stepwise-every needs --stepwise DIR"),
    (["--stepwise", "steps", "--stepwise-every", "0"], "--stepwise-every must be at least 1"),
    (["--prompt-file", "{d}/bad.jsonl", "--prompt", None], "give --prompt or --prompt-file"),
    (["--prompt-file", "{d}/bad.jsonl"], "bad.jsonl line 2: seed -4 is out of range"),
    (["--from", "{d}/plain.png"], "no generation settings found"),
    (["--from", "{d}/notes.png"], "not an image or a JSON sidecar"),
    (["--from", "{d}/init.png", "--prompt-file", "{d}/bad.jsonl"], "give --prompt-file or --from"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_before_the_model_is_resolved(extra, message, files, tmp_path, monkeypatch):
    def resolve(*args, **kwargs):
        raise AssertionError("the model was resolved before the settings were checked")

    monkeypatch.setattr("mflux.run.resolve_model", resolve)
    args = [a.format(d=files) if a else PROMPT for a in extra]
    if "--prompt" not in args and "--prompt-file" not in args and "--from" not in args:
        args = ["--prompt", PROMPT, *args]
    result = invoke("-m", "schnell", *args, cwd=tmp_path / "out")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_no_prompt_is_one_line(tmp_path):
    result = invoke("-m", "schnell", "--seed", "1", cwd=tmp_path)
    assert result.exit_code == 1
    assert result.output.strip() == "error: give --prompt, --prompt-file or --from (see: mflux run --help)"


def test_a_bad_seed_is_refused_before_the_store_is_asked(tmp_path):
    # a real process: the model is not in the store and may not be pulled, yet the seed error comes first
    cmd = [sys.executable, "-m", "mflux", "run", "-m", "dev", "--no-pull", "--prompt", PROMPT]
    proc = subprocess.run([*cmd, "--seed", "-3"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: seed -3 is out of range (a seed is a whole number from 0 to 2**64-1 = 18446744073709551615)"
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "--no-pull" in proc.stderr  # the same command, good seed: the store


def test_from_replays_an_image_exactly(tiny_schnell, tmp_path):
    store_hf_folder(tiny_schnell, "tiny")
    args = ["-m", "tiny", *SMALL, "--seed", "3", "--negative-prompt", "blurry"]
    made = invoke(*args, "--prompt", PROMPT, "--output", "a.png", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    meta = json.loads(Image.open(tmp_path / "a.png").text["mflux"])
    assert (meta["negative_prompt"], meta["true_cfg_scale"]) == ("blurry", 4.0)
    # no -m: the model the image records (else the default, schnell, which this store lacks)
    again = invoke("--from", "a.png", "--output", "b.png", "--no-pull", cwd=tmp_path)
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert "settings from a.png (mflux metadata)" in again.output
    assert "model tiny, from the image" in again.output
    # an explicit flag overrides the recalled setting
    other = invoke(
        "--path", str(tiny_schnell), "-C", "a.png", "--seed", "4", "--output", "c.png", cwd=tmp_path
    )
    assert other.exit_code == 0, other.output
    assert json.loads(Image.open(tmp_path / "c.png").text["mflux"])["seed"] == 4
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_from_replays_an_inpainting_and_needs_its_files(tiny_dev, tmp_path, files):
    args = ["--path", str(tiny_dev), "--steps", "3", "--seed", "5", "--guidance", "4.5"]
    inpaint = ["--image", str(files / "init.png"), "--mask", str(files / "mask.png"), "--strength", "0.7"]
    made = invoke(*args, *inpaint, "--prompt", PROMPT, "--output", "a.png", "--metadata", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    tags = Image.open(tmp_path / "a.png").text
    assert tags["Strength"] == "0.7" and len(tags["InitImageSHA256"]) == len(tags["MaskSHA256"]) == 64
    again = invoke("--path", str(tiny_dev), "--from", "a.json", "--output", "b.png", cwd=tmp_path)
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    Image.new("L", (32, 32), 0).save(files / "mask.png")
    changed = invoke("--path", str(tiny_dev), "--from", "a.png", cwd=tmp_path)
    assert changed.exit_code == 1 and "its mask" in changed.output and "has changed since" in changed.output


def test_from_an_a1111_image_says_what_came_from_the_defaults(tiny_schnell, tmp_path):
    write_png(
        tmp_path / "forge.png",
        text={"parameters": f"{PROMPT}\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 32x32"},
    )
    result = invoke("--path", str(tiny_schnell), "--from", "forge.png", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "CFG scale 7 ignored (true CFG needs a negative prompt)" in result.output
    assert "lacks --guidance: using the defaults" in result.output
    meta = json.loads(Image.open(tmp_path / "image.png").text["mflux"])
    assert (meta["seed"], meta["steps"], meta["width"], meta["prompt"]) == (11, 2, 32, PROMPT)


def test_a_prompt_file_equals_the_single_image_path(tiny_schnell, tmp_path):
    lines = [
        "a red bicycle",
        json.dumps({"prompt": "a lighthouse", "seeds": [1, 2], "steps": 3}),
        "# a comment",
        json.dumps({"prompt": "a cat", "seed": 9, "negative_prompt": "dogs", "true_cfg": 3}),
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--path", str(tiny_schnell), *SMALL, "--seed", "5", "--prompt-file", "p.jsonl", "--json"]
    result = invoke(*args, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    got = [(Path(i["file"]).name, i["seed"], i["prompt_file_line"]) for i in summary["images"]]
    assert got == [
        ("image_line1_seed_5.png", 5, "p.jsonl:1"),
        ("image_line2_seed_1.png", 1, "p.jsonl:2"),
        ("image_line2_seed_2.png", 2, "p.jsonl:2"),
        ("image_line4_seed_9.png", 9, "p.jsonl:4"),
    ]
    assert all(i["seconds"] > 0 for i in summary["images"]) and summary["seconds"] > 0
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    want = {
        "image_line1_seed_5.png": flux.generate_image(5, "a red bicycle", Config(2, 32, 32)),
        "image_line2_seed_1.png": flux.generate_image(1, "a lighthouse", Config(3, 32, 32)),
        "image_line2_seed_2.png": flux.generate_image(2, "a lighthouse", Config(3, 32, 32)),
        "image_line4_seed_9.png": flux.generate_image(
            9, "a cat", Config(2, 32, 32), negative_prompt="dogs", true_cfg_scale=3.0
        ),
    }
    for name, image in want.items():
        assert np.array_equal(pixels(tmp_path / name), np.array(image.image)), name
    assert (
        json.loads(Image.open(tmp_path / "image_line4_seed_9.png").text["mflux"])["prompt_file_line"]
        == "p.jsonl:4"
    )


def test_prompt_file_lines_share_a_batch(tiny_schnell, tmp_path, monkeypatch):
    monkeypatch.setattr(mflux.run, "_on_a_terminal", lambda: True)  # the progress bar tells the batches
    (tmp_path / "p.txt").write_text("a red bicycle\na lighthouse\n")
    args = ["--path", str(tiny_schnell), *SMALL, "--seed", "5", "--prompt-file", "p.txt", "--batch-size", "2"]
    result = invoke(*args, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "seed 5, 5 [" in result.output  # one progress bar: the two lines denoised as one batch
    flux = Flux1.from_path(tiny_schnell, precision="float32")
    for n, prompt in enumerate(["a red bicycle", "a lighthouse"], 1):
        alone = np.array(flux.generate_image(5, prompt, Config(2, 32, 32)).image).astype(int)
        assert np.abs(pixels(tmp_path / f"image_line{n}_seed_5.png").astype(int) - alone).max() <= 1
    # the text summary: one line per image, then the total
    out = [line for line in result.stdout.splitlines() if line]
    assert out[0].startswith("image_line1_seed_5.png  seed 5  ") and out[0].endswith("s")
    assert out[1].startswith("image_line2_seed_5.png  seed 5  ")
    assert out[2].startswith("2 images in ") and "denoising" in out[2]


def test_stepwise_writes_every_step_and_a_strip(tiny_schnell, tmp_path):
    args = ["--path", str(tiny_schnell), "--height", "32", "--width", "48", "--steps", "3", "--seed", "2"]
    result = invoke(*args, "--prompt", PROMPT, "--stepwise", "steps", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == [
        "image_step_1.png",
        "image_step_2.png",
        "image_step_3.png",
        "image_steps.png",
    ]
    final = pixels(tmp_path / "image.png")
    assert np.array_equal(pixels(tmp_path / "steps" / "image_step_3.png"), final)
    assert not np.array_equal(pixels(tmp_path / "steps" / "image_step_1.png"), final)
    strip = pixels(tmp_path / "steps" / "image_steps.png")
    assert_labelled(strip, 32, 48, [1, 2, 3])
    assert np.array_equal(strip[:32, 96:], final)  # the band is under the frames, not over them


def assert_labelled(strip: np.ndarray, height: int, width: int, steps: list[int]) -> None:
    """Under each frame of a --stepwise strip, a band with its own step number in dark ink."""
    assert strip.shape[0] > height and strip.shape[1] == width * len(steps), f"no label band: {strip.shape}"
    from mflux.run import step_label  # the band's height and font are the strip's own choice

    bands = [strip[height:, i * width : (i + 1) * width] for i in range(len(steps))]
    for k, band in zip(steps, bands):
        assert (band < 100).all(axis=-1).sum() > 10, f"no label under the frame of step {k}"
        assert np.array_equal(band, np.array(step_label(k, width, band.shape[0]))), f"step {k} mislabelled"
    assert len({band.tobytes() for band in bands}) == len(bands), "two frames share a label"


def test_stepwise_every_k_steps_and_the_last(tiny_schnell, tmp_path, files):
    args = ["--path", str(tiny_schnell), "--height", "32", "--width", "32", "--seed", "2", "--prompt", PROMPT]
    result = invoke(*args, "--steps", "5", "--stepwise", "a", "--stepwise-every", "2", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "image_step_2.png",
        "image_step_4.png",
        "image_step_5.png",
        "image_steps.png",
    ]
    strip = pixels(tmp_path / "a" / "image_steps.png")
    assert_labelled(strip, 32, 32, [2, 4, 5])
    assert np.array_equal(pixels(tmp_path / "a" / "image_step_5.png"), pixels(tmp_path / "image.png"))
    # img2img at strength 0.5 keeps 2 of 4 steps: the last kept step is previewed
    img2img = ["--steps", "4", "--image", str(files / "init.png"), "--strength", "0.5", "--output", "b.png"]
    result = invoke(*args, *img2img, "--stepwise", "b", "--stepwise-every", "3", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["b_step_2.png", "b_steps.png"]
    assert np.array_equal(pixels(tmp_path / "b" / "b_step_2.png"), pixels(tmp_path / "b.png"))


def test_n_random_seeds_and_img2img_size_from_the_image(tiny_schnell, tmp_path, files):
    write_png(files / "wide.png", size=(70, 40))
    args = ["--path", str(tiny_schnell), "--steps", "1", "-n", "2", "--image", str(files / "wide.png")]
    result = invoke(*args, "--prompt", PROMPT, "--strength", "0.5", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    images = json.loads(result.stdout)["images"]
    assert len(images) == 2 and images[0]["seed"] != images[1]["seed"]
    for i in images:
        assert Path(i["file"]).name == f"image_seed_{i['seed']}.png"
        assert Image.open(tmp_path / i["file"]).size == (64, 32)  # rounded down to multiples of 16
    assert "size 64x32, from the image (70x40)" in result.output


def test_prompt_file_lines_with_their_own_loras(tiny_schnell, tmp_path):
    rng = np.random.default_rng(0)
    pair = lora_files.pair(rng, 4, 64, 64, 2.0)
    style = {f"transformer.transformer_blocks.{i}.attn.to_q": pair for i in range(2)}
    lora_files.save(tmp_path / "style.safetensors", lora_files.peft(style))
    lines = ["a red bicycle", json.dumps({"prompt": "a red bicycle", "loras": [["style.safetensors", 0.8]]})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--path", str(tiny_schnell), *SMALL, "--seed", "5", "--prompt-file", "p.jsonl"]
    result = invoke(*args, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    lora = str((tmp_path / "style.safetensors").resolve())
    plain = Flux1.from_path(tiny_schnell, precision="float32").generate_image(
        5, "a red bicycle", Config(2, 32, 32)
    )
    styled = Flux1.from_path(tiny_schnell, precision="float32", lora_paths=[lora], lora_scales=[0.8])
    styled = styled.generate_image(5, "a red bicycle", Config(2, 32, 32))
    assert np.array_equal(pixels(tmp_path / "image_line1_seed_5.png"), np.array(plain.image))
    assert np.array_equal(pixels(tmp_path / "image_line2_seed_5.png"), np.array(styled.image))
    assert not np.array_equal(np.array(plain.image), np.array(styled.image))
    meta = json.loads(Image.open(tmp_path / "image_line2_seed_5.png").text["mflux"])
    assert (meta["lora_paths"], meta["lora_scales"]) == ([lora], [0.8])
