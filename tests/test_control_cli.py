"""`mflux run -m canny --control-from PHOTO --canny`: the edge map computed by mflux.canny before anything
loads, followed as --control follows a ready map, saved with --save-control, recorded and replayed; and the
misuses refused in one line before any load."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from mflux.canny import canny
from tests.test_generation import PROMPT, init_image
from tests.test_kontext_fill import _cli, _meta


def photo(height: int, width: int) -> Image.Image:
    """A photo stand-in with edges of several strengths: gradients and a bright square."""
    rgb = np.array(init_image(height, width))
    rgb[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = (250, 240, 120)
    return Image.fromarray(rgb)


def pixels(path) -> np.ndarray:
    return np.array(Image.open(path))


def test_cli_canny_from_a_photo_follows_its_edges_saves_them_and_replays_exactly(tiny_canny, tmp_path):
    photo(32, 48).save(tmp_path / "photo.png")
    args = [
        "--path",
        str(tiny_canny),
        "--variant",
        "canny",
        "--steps",
        "2",
        "--seed",
        "5",
        "--prompt",
        PROMPT,
    ]
    made = _cli(
        *args, "--control-from", "photo.png", "--canny", "--canny-thresholds", "40,120", "--save-control",
        "-o", "c.png", cwd=tmp_path,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    edges = canny(Image.open(tmp_path / "photo.png"), 40, 120)
    assert edges.any() and np.array_equal(pixels(tmp_path / "c_control.png"), edges)  # --save-control
    m = _meta(tmp_path / "c.png")
    assert m["control_from_sha256"] == hashlib.sha256((tmp_path / "photo.png").read_bytes()).hexdigest()
    assert m["canny_thresholds"] == [40.0, 120.0] and (m["width"], m["height"]) == (48, 32)
    assert "control_path" not in m  # the map was computed, not read from a file
    assert Image.open(tmp_path / "c.png").text["CannyThresholds"] == "40,120"  # as exiftool shows it
    # the computed map acts as a ready one given to --control
    ready = _cli(*args, "--control", "c_control.png", "-o", "ready.png", cwd=tmp_path)
    assert ready.exit_code == 0, ready.output
    assert np.array_equal(pixels(tmp_path / "c.png"), pixels(tmp_path / "ready.png"))
    again = _cli(
        "--path", str(tiny_canny), "--variant", "canny", "--from", "c.png", "-o", "d.png", cwd=tmp_path
    )
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "c.png"), pixels(tmp_path / "d.png"))
    assert _meta(tmp_path / "d.png")["canny_thresholds"] == [40.0, 120.0]


def test_cli_canny_thresholds_default_to_the_reference_ones(tmp_path):
    from mflux.run import plan

    photo(32, 48).save(tmp_path / "photo.png")
    values = {"prompt": PROMPT, "control_from": str(tmp_path / "photo.png"), "canny": True, "seeds": [1]}
    s = plan(values, set(values), output=str(tmp_path / "a.png"), variant="canny").generations[0]
    assert s.canny_thresholds == (50.0, 200.0) and (s.width, s.height) == (48, 32)


@pytest.mark.parametrize(
    "variant, extra, words",
    [
        ("canny", ["--control-from", "photo.png"], "--control-from PHOTO needs the detector that makes its map: add --canny"),
        ("canny", ["--canny"], "--canny computes the edge map of a photo: give --control-from PHOTO"),
        ("canny", ["--control", "photo.png", "--canny-thresholds", "50,200"], "--canny-thresholds needs --canny"),
        ("canny", ["--control-from", "photo.png", "--canny", "--control", "photo.png"], "not both"),
        ("canny", ["--control-from", "photo.png", "--canny", "--canny-thresholds", "200,50"], "the low one is above"),
        ("canny", ["--control-from", "photo.png", "--canny", "--canny-thresholds", "-1,50"], "is not a number >= 0"),
        ("canny", ["--control-from", "photo.png", "--canny", "--canny-thresholds", "50"], "is not LOW,HIGH"),
        ("canny", ["--control-from", "notes.png", "--canny"], "not an image PIL can read"),
        ("canny", ["--control", "photo.png", "--save-control"], "--save-control saves the edge map --canny computes"),
        ("depth", ["--control-from", "photo.png", "--canny"], "give it ready with --control (make one with a depth estimator such as Depth Anything"),
        ("dev", ["--control-from", "photo.png", "--canny"], "--control-from makes the map a control model follows (-m canny); dev takes none (or give dev a Control LoRA: --lora-paths canny-lora)"),
    ],
)  # fmt: skip
def test_cli_refuses_canny_misuse_before_any_load(
    variant, extra, words, tmp_path, monkeypatch, tiny_canny, tiny_depth, tiny_dev
):
    import mflux.flux1

    photo(32, 48).save(tmp_path / "photo.png")
    (tmp_path / "notes.png").write_text("not an image")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was opened before the settings were refused")

    monkeypatch.setattr(mflux.flux1.Flux1, "__init__", no_load)
    folder = {"canny": tiny_canny, "depth": tiny_depth, "dev": tiny_dev}[variant]
    named = ["--variant", variant] if variant != "dev" else []
    result = _cli("--path", str(folder), *named, "--prompt", PROMPT, "--steps", "1", *extra, cwd=tmp_path)
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert words in lines[0], result.output
