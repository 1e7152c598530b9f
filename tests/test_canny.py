"""mflux.canny against OpenCV's cv2.Canny (opencv-python-headless, a test extra only)."""

import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from mflux.canny import canny
from mflux.errors import InvalidArgument

THRESHOLDS = [(50, 200), (100, 200), (20, 60)]
SIZE = (160, 128)  # (W, H): not square, so a swapped axis shows


def gradient_field(rng, channels: int) -> np.ndarray:
    # a smooth background: a random plane plus a few broad blobs, per channel
    h, w = SIZE[1], SIZE[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((h, w, channels))
    for c in range(channels):
        a, b, base = rng.uniform(-150, 150), rng.uniform(-150, 150), rng.uniform(60, 190)
        field = base + a * (xx - 0.5) + b * (yy - 0.5)
        for _ in range(3):
            cy, cx, r, amp = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4), rng.uniform(-80, 80)
            field += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[:, :, c] = field
    return out


def draw_shapes(image: Image.Image, rng, count: int) -> None:
    draw = ImageDraw.Draw(image)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    for k in range(count):
        x0, y0 = rng.integers(-20, SIZE[0]), rng.integers(-20, SIZE[1])
        x1, y1 = x0 + rng.integers(8, 80), y0 + rng.integers(8, 80)
        shape = ("ellipse", "rectangle", "polygon", "line")[k % 4]
        if shape == "polygon":
            draw.polygon([tuple(int(v) for v in rng.integers(0, 160, 2)) for _ in range(5)], fill=colour())
        elif shape == "line":
            draw.line([(x0, y0), (x1, y1)], fill=colour(), width=int(rng.integers(1, 4)))
        else:
            getattr(draw, shape)([x0, y0, x1, y1], fill=colour(), outline=colour())


def photo(seed: int) -> Image.Image:
    """Photo-like: smooth gradients, shapes, a slight blur and sensor noise."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(np.clip(gradient_field(rng, 3), 0, 255).astype(np.uint8))
    draw_shapes(image, rng, count=6)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    noisy = np.asarray(image) + rng.normal(0, rng.uniform(1, 8), (SIZE[1], SIZE[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def rectangles() -> Image.Image:
    image = Image.new("L", SIZE, 30)
    draw = ImageDraw.Draw(image)
    for k in range(5):
        draw.rectangle([10 + 25 * k, 8 + 15 * k, 60 + 20 * k, 50 + 12 * k], fill=60 + 35 * k)
    return image


def circles() -> Image.Image:
    image = Image.new("RGB", SIZE, (200, 190, 180))
    draw = ImageDraw.Draw(image)
    for k, r in enumerate((60, 45, 30, 15, 5)):
        draw.ellipse([80 - r, 64 - r, 80 + r, 64 + r], fill=(40 * k, 255 - 40 * k, 90), outline=(0, 0, 0))
    return image


def thin_lines() -> Image.Image:
    image = Image.new("L", SIZE, 0)
    draw = ImageDraw.Draw(image)
    for k in range(12):  # one-pixel lines at many angles, touching the borders
        draw.line([(0, 10 * k), (SIZE[0] - 1, 127 - 9 * k)], fill=255 - 15 * k, width=1)
    draw.line([(5, 0), (5, SIZE[1] - 1)], fill=255)
    return image


def spiral() -> Image.Image:
    """One long line whose contrast grows along it: hysteresis follows a long chain from its strong end."""
    image = Image.new("L", SIZE, 0)
    draw = ImageDraw.Draw(image)
    t = np.linspace(0, 14 * np.pi, 4000)
    points = list(zip(80 + 1.2 * t * np.cos(t), 64 + 1.2 * t * np.sin(t)))
    for k in range(0, len(points) - 40, 40):
        draw.line(points[k : k + 41], fill=15 + 50 * k // len(points), width=2)
    return image


def checkerboard(cell: int) -> Image.Image:
    yy, xx = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
    board = ((yy // cell + xx // cell) % 2 * 255).astype(np.uint8)
    return Image.fromarray(board)


def texture(seed: int) -> Image.Image:
    """Real-looking texture, like bark: fractal noise (octaves of upsampled random grids), stretched."""
    rng = np.random.default_rng(seed)
    out = np.zeros((SIZE[1], SIZE[0]))
    for octave in range(1, 8):
        cells = rng.uniform(-1, 1, (2**octave + 1, 2 ** (octave - 1) + 1))
        grid = Image.fromarray(cells.astype(np.float32)).resize(SIZE, Image.BICUBIC)
        out += np.asarray(grid) / octave
    out = 128 + 127 * np.tanh(2 * out / np.abs(out).max()) + rng.normal(0, 4, out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).convert("RGB")


def cobblestones(seed: int) -> Image.Image:
    """Real-looking texture: Voronoi cells of random shades, darker towards their borders, with grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
    seeds = rng.uniform(0, 1, (40, 2)) * (SIZE[1], SIZE[0])
    distance = np.hypot(yy[..., None] - seeds[:, 0], xx[..., None] - seeds[:, 1])  # (H, W, 40)
    nearest = np.sort(distance, axis=-1)
    shade = rng.uniform(60, 220, (40, 3))[np.argmin(distance, axis=-1)]  # (H, W, 3)
    mortar = np.clip((nearest[..., 1] - nearest[..., 0]) / 6, 0, 1)[..., None]
    out = shade * mortar + 40 * (1 - mortar) + rng.normal(0, 6, shade.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def random_noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))


IMAGES = {
    **{f"photo{k}": (lambda k=k: photo(k)) for k in range(10)},
    "rectangles": rectangles,
    "circles": circles,
    "thin_lines": thin_lines,
    "spiral": spiral,
    "checkerboard8": lambda: checkerboard(8),
    "checkerboard1": lambda: checkerboard(1),
    "texture0": lambda: texture(0),
    "texture1": lambda: texture(1),
    "cobblestones": lambda: cobblestones(0),
    "noise": lambda: random_noise(0),
    "flat": lambda: Image.new("RGB", SIZE, (90, 90, 90)),
    "gray_photo": lambda: photo(10).convert("L"),
    "tiny": lambda: photo(11).crop((0, 0, 3, 2)),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_canny_equals_opencv(name):
    image = IMAGES[name]()
    worst = 0.0
    for low, high in THRESHOLDS:
        expected = cv2.Canny(np.asarray(image), low, high)
        got = canny(image, low, high)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        worst = max(worst, float(np.mean(got != expected)))
    print(f"{name}: worst {100 * worst:.3f}% of pixels differ")
    assert worst <= 0.005


def test_the_images_have_edges_at_every_threshold_pair():
    # the comparison above means something only if most images give edges at each pair
    for low, high in THRESHOLDS:
        lit = sum(cv2.Canny(np.asarray(make()), low, high).any() for make in IMAGES.values())
        assert lit >= 20, (low, high, lit)


def test_threshold_edges_are_strict_and_hysteresis_follows_diagonals():
    # a step of 40 gives |gx| = 160 at the two columns beside it: an edge only when high < 160
    step = np.zeros((8, 8), np.uint8)
    step[:, 4:] = 40
    assert canny(step, 50, 160).sum() == 0
    assert canny(step, 50, 159).any()
    # a strong bright pixel links a weak diagonal line only through corners
    line = np.zeros((12, 12), np.uint8)
    for i in range(2, 10):
        line[i, i] = 30
    line[2, 2] = 200
    for low, high in [(20, 300), (20, 1000)]:
        np.testing.assert_array_equal(canny(line, low, high), cv2.Canny(line, low, high))


@pytest.mark.parametrize(
    "image, low, high, said",
    [
        (np.zeros((4, 4), np.float32), 50, 200, "not a float32 array"),
        ("photo.png", 50, 200, "not str"),
        (np.zeros((4, 4, 4), np.uint8), 50, 200, "not shape (4, 4, 4)"),
        (np.zeros((0, 4), np.uint8), 50, 200, "not shape (0, 4)"),
        (np.zeros((4, 4), np.uint8), -1, 200, "low=-1 is not a number >= 0"),
        (np.zeros((4, 4), np.uint8), 50, float("nan"), "high=nan is not a number >= 0"),
        (np.zeros((4, 4), np.uint8), 200, 50, "the low one is above the high one"),
    ],
)
def test_bad_input_is_one_clear_error(image, low, high, said):
    with pytest.raises(InvalidArgument, match=re.escape(said)):
        canny(image, low, high)


def test_the_module_runs_without_opencv():
    # cv2 made unimportable: importing and running mflux.canny must not need it
    code = (
        "import sys; sys.modules['cv2'] = None\n"
        "import numpy as np; from mflux.canny import canny\n"
        "assert canny(np.eye(16, dtype=np.uint8) * 255).any()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
