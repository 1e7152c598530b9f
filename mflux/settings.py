"""The settings of one generation, and the checks they pass before anything is downloaded or loaded.

Settings come from CLI flags, from a prompt file's lines (`read_prompt_file`) and from an earlier image
(`recall`: mflux's PNG metadata, its JSON sidecar, or the A1111 `parameters` text other tools write).
Each bad value raises InvalidArgument with one line naming it and the fix.

Limits, and why:
- seeds are integers in 0..2**64-1, the range of MLX's random key;
- width and height are multiples of 16 (8x VAE, then 2x2 packing), at most 4096 a side and 2048x2048
  pixels in all (4.2 megapixels), the limits flux1.Config shares: FLUX.1 is trained up to about 2
  megapixels; the limit leaves room above that, and past it attention's cost, quadratic in the image's
  tokens (16,384 at 2048x2048), makes a step many times slower for an image the model was not made for;
- a prompt is at most 10,000 characters: T5 reads 512 tokens at most (about 2,000 characters of
  English), so a longer text is a file pasted by mistake;
- `--negative-prompt` alone runs true CFG at 4.0, the scale diffusers' FluxPipeline documentation uses
  (`true_cfg_scale=4.0`); at 1 or less true CFG does nothing, which diffusers accepts silently and mflux
  refuses when the scale is given explicitly;
- strength follows diffusers (1.0 is pure noise, 0 is refused) and defaults to diffusers' 0.6
  (FluxImg2ImgPipeline), 1.0 on fill (FluxFillPipeline);
- each variant reads the image flags its own way (`check`'s `variant`): schnell, dev and krea take
  --image for img2img and --mask for inpainting; fill needs --image with --mask, or --expand to
  outpaint; kontext's --image is the reference it edits, and without --width/--height the output takes
  the Kontext resolution nearest the reference's aspect ratio (FluxKontextPipeline's preferred ones).
"""

import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mflux.errors import InvalidArgument, MfluxError

if TYPE_CHECKING:
    from PIL import Image

MAX_SEED = 2**64 - 1
RANDOM_SEED_BELOW = 2**32  # `-n` draws seeds below this: the 32-bit seeds other tools show
MAX_SIDE = 4096
MAX_PIXELS = 2048 * 2048
MAX_PROMPT_CHARS = 10_000
DEFAULT_SIZE = 1024
DEFAULT_TRUE_CFG = 4.0
DEFAULT_STRENGTH = 0.6

# a field's name as the CLI spells it; prompt files use the field names themselves
FLAGS = {
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "seeds": "--seed",
    "steps": "--steps",
    "width": "--width",
    "height": "--height",
    "guidance": "--guidance",
    "true_cfg": "--true-cfg",
    "image": "--image",
    "mask": "--mask",
    "strength": "--strength",
    "expand": "--expand",
    "control": "--control",
    "control_from": "--control-from",
    "canny": "--canny",
    "canny_thresholds": "--canny-thresholds",
    "redux": "--redux",
    "redux_scales": "--redux-scale",
    "loras": "--lora-paths",
}
CANNY_THRESHOLDS = (50.0, 200.0)  # cv2.Canny's in Black Forest Labs' CannyImageEncoder


@dataclass
class Settings:
    """One generation: a prompt and its seeds (one image each), as given; `check` fills the defaults."""

    prompt: str | None = None
    negative_prompt: str | None = None
    seeds: list[int] = field(default_factory=list)  # empty: the caller draws random seeds
    steps: int | None = None  # None: the model's default (schnell 4, dev 25)
    width: int | None = None  # None: the init image's size, else 1024
    height: int | None = None
    guidance: float | None = None  # None: 3.5; dev only
    true_cfg: float | None = None
    image: str | None = None  # img2img / inpaint init image
    mask: str | None = None  # white is repainted
    strength: float | None = None
    expand: tuple[int, int, int, int] | None = None  # fill: outpaint by LEFT, TOP, RIGHT, BOTTOM pixels
    control: str | None = None  # canny, depth: the edge or depth map to follow
    control_from: str | None = None  # canny: the photo whose edge map (`canny_thresholds`) is the control
    canny: bool = False
    canny_thresholds: tuple[float, float] | None = None  # (low, high); check fills cv2.Canny's 50, 200
    loras: list[tuple[str, float]] = field(default_factory=list)  # (path, scale)
    redux: list[str] = field(default_factory=list)  # Redux's reference images
    redux_scales: list[float] = field(default_factory=list)  # one per image; check fills 1.0
    redux_sha256: list[str] = field(default_factory=list)
    image_sha256: str | None = None
    mask_sha256: str | None = None
    control_sha256: str | None = None
    control_from_sha256: str | None = None
    source: str | None = None  # "prompts.jsonl:3": the prompt file line it came from
    notes: list[str] = field(default_factory=list, compare=False)  # what check decided, for the user

    def batch_key(self) -> tuple:
        """Settings that must be equal for two generations to share one Flux1.generate call, and so
        its denoising batches: one init image, one schedule, one CFG scale, one set of LoRAs."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.true_cfg,
            self.image,
            self.mask,
            self.strength,
            self.expand,
            self.control,
            self.control_from,
            self.canny_thresholds,
            tuple(self.loras),
            tuple(self.redux),
            tuple(self.redux_scales),
            self.prompt if self.redux else None,  # Redux's embeddings hold the prompt: one per call
        )


class _Where:
    """How errors name things: CLI flags, or `FILE line N:` and the prompt file's keys."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def name(self, key: str) -> str:
        return key if self.prefix else FLAGS.get(key, key)

    def fail(self, message: str) -> InvalidArgument:
        return InvalidArgument(self.prefix + message)


def check(s: Settings, explicit: Iterable[str] = (), where: str = "", variant: str = "schnell") -> Settings:
    """A copy of `s` with defaults filled in and every value checked for `variant`; raises
    InvalidArgument.

    `explicit` names the fields the user gave directly (flags, prompt file keys): the true-CFG usage
    errors apply to those only, never to settings recalled from an image."""
    w = _Where(where)
    s = replace(s, seeds=list(s.seeds), loras=list(s.loras), notes=list(s.notes), redux=list(s.redux))
    if not (s.redux and s.prompt is None):  # Redux runs from the images alone
        s.prompt = _prompt(s.prompt, "prompt", w, required=True)
    s.negative_prompt = _prompt(s.negative_prompt, "negative_prompt", w) or None
    s.seeds = [_seed(v, w) for v in s.seeds]
    if s.steps is not None and (not _is_int(s.steps) or s.steps < 1):
        raise w.fail(f"{w.name('steps')} must be a whole number of at least 1, got {s.steps!r}")
    for key in ("guidance", "true_cfg", "strength"):
        setattr(s, key, _finite(getattr(s, key), key, w))
    if s.guidance is not None and s.guidance < 0:
        raise w.fail(
            f"{w.name('guidance')} must be 0 or more, got {s.guidance:g} (the distilled guidance; "
            "higher follows the prompt more closely)"
        )
    s.notes += _repeated_seeds(s.seeds)
    # the LoRAs before the condition: a Control LoRA makes dev take a control image
    s.loras = [_lora(path, scale, w) for path, scale in s.loras]
    condition = _condition(variant, s.loras, w)
    _variant_flags(s, variant, condition, w)
    _redux(s, variant, condition, w)
    image_size = _images(s, w)
    if condition == "kontext" and image_size is not None and s.width is None and s.height is None:
        from mflux.flux1 import kontext_size

        s.width, s.height = kontext_size(*image_size)
        s.notes.append(
            f"size {s.width}x{s.height}: the Kontext resolution nearest the image's aspect ratio "
            f"({image_size[0]}x{image_size[1]}); --width/--height choose another"
        )
    _size(s, image_size, w)
    _strength(s, w, condition)
    _true_cfg(s, set(explicit), w)
    return s


def _prompt(text, key: str, w: _Where, required: bool = False) -> str:
    # an empty (or blank) prompt is a prompt, as in diffusers; a missing one is refused
    if text is None or (not required and isinstance(text, str) and not text.strip()):
        if required:
            raise w.fail(f"no prompt (give {w.name('prompt')} with the image to describe)")
        return ""
    if not isinstance(text, str):
        raise w.fail(f"{w.name(key)} must be text, got {text!r}")
    bad = not_utf8(text)
    if bad:
        raise w.fail(f"{w.name(key)} is not valid text: {bad} (give it as UTF-8)")
    if len(text) > MAX_PROMPT_CHARS:
        raise w.fail(
            f"{w.name(key)} is {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,} "
            "(T5 reads at most 512 tokens, about 2,000 characters)"
        )
    return text


def not_utf8(text: str) -> str | None:
    """Why `text` can't be written as UTF-8 (a lone surrogate: JSON's "\\ud800", or bytes in argv that are
    not UTF-8, which Python keeps as surrogates), or None. Tokenizers and PNG text need UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"character {e.start + 1} is a lone surrogate (U+{ord(text[e.start]):04X}), which UTF-8 cannot encode"
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _seed(v, w: _Where) -> int:
    if not _is_int(v) or not 0 <= v <= MAX_SEED:
        raise w.fail(f"seed {v!r} is out of range (a seed is a whole number from 0 to 2**64-1 = {MAX_SEED})")
    return v


def _repeated_seeds(seeds: list[int]) -> list[str]:
    # A note, not a refusal: the command still does what was asked, and a script that repeats a seed
    # keeps working; the note says why two files are the same image.
    twice = sorted({v for v in seeds if seeds.count(v) > 1})
    if not twice:
        return []
    listed = ", ".join(map(str, twice))
    return [
        f"seed{'s' if len(twice) > 1 else ''} {listed} given more than once: those images will be identical"
    ]


def _finite(v, key: str, w: _Where) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise w.fail(f"{w.name(key)} must be a finite number, got {v!r}")
    return float(v)


def _condition(variant: str, loras: list = (), w: _Where | None = None) -> str:
    """What the variant's engine takes besides the prompt: "text", "fill", "kontext" or "control"; a
    Control LoRA (its img_in wider than the model's) makes dev "control", and is refused elsewhere."""
    from mflux.runtime.folder import VARIANTS

    known = VARIANTS.get(variant)
    condition = known.condition if known else "text"
    width = known.in_channels if known else 64
    control = [path for path, _ in loras if (_lora_header(path)[1] or 0) > width]
    if not control:
        return condition
    if known is None or not (condition == "text" and known.guidance_embeds):
        raise (w or _Where()).fail(
            f"{control[0]} is a Control LoRA for FLUX.1 dev (its x_embedder takes the control image's "
            f"channels); {variant} can't take it (use dev: -m dev)"
        )
    return "control"


def _variant_flags(s: Settings, variant: str, condition: str, w: _Where) -> None:
    """The image flags a variant can't use, refused naming the model that can."""
    _control_flags(s, variant, condition, w)
    if s.expand is not None and condition != "fill":
        raise w.fail(f"{w.name('expand')} outpaints with the fill model (-m fill); {variant} can't")
    if condition == "kontext":
        if s.mask is not None:
            raise w.fail(f"kontext takes no {w.name('mask')} yet; -m fill inpaints")
        if s.strength is not None:
            raise w.fail(
                f"kontext takes no {w.name('strength')}: it edits the whole image by instruction "
                "(img2img with --strength: -m dev; inpainting: -m fill)"
            )
    if condition == "fill":
        if s.image is None:
            raise w.fail(
                f"fill repaints part of an image: give {w.name('image')} with {w.name('mask')} "
                f"(or {w.name('expand')} to outpaint)"
            )
        if s.mask is None and s.expand is None:
            raise w.fail(
                f"fill repaints what {w.name('mask')} marks white, or the border {w.name('expand')} adds: "
                "give one"
            )
        if s.mask is not None and s.expand is not None:
            raise w.fail(f"give {w.name('mask')} or {w.name('expand')}, not both (--expand makes the mask)")


def _control_flags(s: Settings, variant: str, condition: str, w: _Where) -> None:
    flag = w.name("control")
    _canny_flags(s, variant, condition, w)
    if condition != "control":
        if s.control is not None:
            raise w.fail(
                f"{flag} needs a control model (-m canny or -m depth); {variant} takes none (or give dev a "
                "Control LoRA: --lora-paths canny-lora)"
            )
        return
    if s.control is None and s.control_from is None:
        what = variant if _condition(variant) == "control" else f"{variant} with a Control LoRA"
        hint = f" (or {w.name('control_from')} PHOTO {w.name('canny')})" if variant != "depth" else ""
        raise w.fail(f"{what} follows an edge or depth map: give {flag} IMAGE{hint}")
    given = [w.name(k) for k in ("image", "mask", "strength", "expand") if getattr(s, k) is not None]
    if given:
        raise w.fail(
            f"{variant} with {', '.join(given)} is not supported yet (diffusers' FluxControlImg2ImgPipeline "
            "and FluxControlInpaintPipeline): give the control image alone"
        )


def _canny_flags(s: Settings, variant: str, condition: str, w: _Where) -> None:
    """--control-from PHOTO --canny [--canny-thresholds LOW,HIGH]: the edge map mflux computes."""
    source, canny = w.name("control_from"), w.name("canny")
    if s.canny_thresholds is not None and not s.canny:
        raise w.fail(f"{w.name('canny_thresholds')} needs {canny} (the thresholds of its edge detector)")
    if s.canny and s.control_from is None:
        raise w.fail(f"{canny} computes the edge map of a photo: give {source} PHOTO")
    if s.control_from is None:
        return
    if condition != "control":
        raise w.fail(
            f"{source} makes the map a control model follows (-m canny); {variant} takes none (or give dev a "
            "Control LoRA: --lora-paths canny-lora)"
        )
    if variant == "depth":  # no depth estimator in mflux: a second model family
        raise w.fail(
            f"depth follows a depth map, which mflux does not compute: give it ready with "
            f"{w.name('control')} (make one with a depth estimator such as Depth Anything, as "
            "diffusers' FluxControlPipeline example does)"
        )
    if s.control is not None:
        raise w.fail(f"give {w.name('control')} (a ready map) or {source} (a photo), not both")
    if not s.canny:
        raise w.fail(f"{source} PHOTO needs the detector that makes its map: add {canny}")
    from mflux.canny import check_thresholds

    low, high = s.canny_thresholds if s.canny_thresholds is not None else CANNY_THRESHOLDS
    try:
        check_thresholds(low, high)
    except InvalidArgument as e:
        raise w.fail(f"{w.name('canny_thresholds')}: {e}") from None
    s.canny_thresholds = (float(low), float(high))


def edge_map(s: Settings):
    """The control map --control-from and --canny make: cv2.Canny's edges of the photo (uint8 (H, W), white
    on black), or None for settings without one. Computed before any model loads."""
    if s.control_from is None:
        return None
    from mflux.canny import canny

    return canny(open_image(s.control_from, f"{FLAGS['control_from']} {s.control_from}"), *s.canny_thresholds)


def _redux(s: Settings, variant: str, condition: str, w: _Where) -> None:
    """--redux IMAGE... [--redux-scale S...]: each image checked and hashed, one scale each (default 1.0)."""
    flag, scale_flag = w.name("redux"), w.name("redux_scales")
    if not s.redux:
        if s.redux_scales:
            raise w.fail(f"{scale_flag} needs {flag} IMAGE (one scale per image)")
        return
    if condition != "text":
        raise w.fail(f"{flag} with {variant} is not supported yet (Redux works with schnell, dev and krea)")
    if s.negative_prompt:
        raise w.fail(f"{flag} with {w.name('negative_prompt')} (true CFG with Redux) is not supported yet")
    if s.image is not None:
        raise w.fail(f"{flag} with {w.name('image')} (img2img or inpainting with Redux) is not supported yet")
    scales = list(s.redux_scales) or [1.0]
    scales = scales * len(s.redux) if len(scales) == 1 else scales
    if len(scales) != len(s.redux):
        raise w.fail(
            f"{len(s.redux)} {flag} images but {len(s.redux_scales)} {scale_flag} values "
            "(give one per image, or one for all)"
        )
    s.redux_scales = [_finite(v, "redux_scales", w) for v in scales]
    for path in s.redux:
        open_image(path, f"{w.prefix}{flag} {path}")
    s.redux_sha256 = [sha256(path) for path in s.redux]


def _images(s: Settings, w: _Where) -> tuple[int, int] | None:
    """The init image's size (width, height), after checking it, the mask and the expansion (the size is
    then the expanded one); fills their sha256."""
    if s.mask is not None and s.image is None:
        raise w.fail(f"{w.name('mask')} needs {w.name('image')}: a mask marks what to repaint in an image")
    if s.control is not None:  # a control model's output takes the map's size, as img2img the image's
        size = open_image(s.control, f"{w.prefix}{w.name('control')} {s.control}").size
        s.control_sha256 = sha256(s.control)
        return size
    if s.control_from is not None:  # its edge map has the photo's size
        size = open_image(s.control_from, f"{w.prefix}{w.name('control_from')} {s.control_from}").size
        s.control_from_sha256 = sha256(s.control_from)
        return size
    if s.image is None:
        return None
    size = open_image(s.image, f"{w.prefix}{w.name('image')} {s.image}").size
    if s.mask is not None:
        mask = open_image(s.mask, f"{w.prefix}{w.name('mask')} {s.mask}")
        if mask.size != size:
            raise w.fail(
                f"the mask {s.mask} is {mask.width}x{mask.height} but the image {s.image} is "
                f"{size[0]}x{size[1]} (they must be the same size)"
            )
        if mask.convert("L").getextrema()[1] < 128:  # binarized at 0.5, as diffusers does
            raise w.fail(f"the mask {s.mask} is all black: nothing to repaint (white marks what to repaint)")
        s.mask_sha256 = sha256(s.mask)
    s.image_sha256 = sha256(s.image)
    if s.expand is not None:
        size = _expanded_size(s.expand, size, w)
        s.expand = tuple(s.expand)
    return size


def _expanded_size(expand, size: tuple[int, int], w: _Where) -> tuple[int, int]:
    flag = w.name("expand")
    if (
        not isinstance(expand, list | tuple)
        or len(expand) != 4
        or any(not _is_int(m) or m < 0 or m % 16 for m in expand)
    ):
        raise w.fail(
            f"{flag} takes LEFT,TOP,RIGHT,BOTTOM in pixels, each a multiple of 16 (e.g. 0,0,256,0), "
            f"got {expand!r}"
        )
    if not any(expand):
        raise w.fail(f"{flag} 0,0,0,0 adds nothing to outpaint; give a margin (e.g. 0,0,256,0)")
    width, height = size[0] + expand[0] + expand[2], size[1] + expand[1] + expand[3]
    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise w.fail(
            f"{flag} makes the image {width}x{height}, above the limits ({MAX_SIDE} a side, "
            f"{MAX_PIXELS:,} pixels); expand less"
        )
    return width, height


def open_image(path: str | Path, label: str | None = None) -> "Image.Image":
    """An image file, decoded now so that a damaged file is caught here; errors begin with `label`
    (`--image a.png`; default: the path)."""
    from PIL import Image, UnidentifiedImageError

    p, label = Path(path), label or str(path)
    if not p.is_file():
        raise InvalidArgument(f"{label}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()  # a closed image's pixels are gone
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidArgument(f"{label}: not an image PIL can read ({e})") from None


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _size(s: Settings, image: tuple[int, int] | None, w: _Where) -> None:
    if image is not None and s.width is None and s.height is None:
        s.width, s.height = _fit(*image)
        s.notes.append(f"size {s.width}x{s.height}, from the image ({image[0]}x{image[1]})")
    elif image is not None and (s.width is None or s.height is None):
        # one side given: the other keeps the image's aspect ratio
        if s.width is None:
            s.width = max(16, round(s.height * image[0] / image[1] / 16) * 16)
        else:
            s.height = max(16, round(s.width * image[1] / image[0] / 16) * 16)
    s.width = DEFAULT_SIZE if s.width is None else s.width
    s.height = DEFAULT_SIZE if s.height is None else s.height
    for key in ("width", "height"):
        v = getattr(s, key)
        if not _is_int(v) or v <= 0 or v % 16:
            raise w.fail(f"{w.name(key)} must be a positive multiple of 16 (e.g. 512, 768, 1024), got {v!r}")
        if v > MAX_SIDE:
            raise w.fail(f"{w.name(key)} {v} is above the limit of {MAX_SIDE} pixels a side")
    if s.width * s.height > MAX_PIXELS:
        raise w.fail(
            f"{s.width}x{s.height} is {s.width * s.height:,} pixels, above the limit of {MAX_PIXELS:,} "
            "(2048x2048 or 4096x1024; FLUX.1 is trained up to about 2 megapixels)"
        )


def _fit(width: int, height: int) -> tuple[int, int]:
    """An image's size rounded down to multiples of 16, scaled down first to fit the limits."""
    scale = min(1.0, MAX_SIDE / max(width, height), math.sqrt(MAX_PIXELS / (width * height)))
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)


def _strength(s: Settings, w: _Where, condition: str) -> None:
    if s.strength is not None and s.image is None:
        raise w.fail(
            f"{w.name('strength')} needs {w.name('image')} (strength says how much of it to repaint)"
        )
    if s.image is None or condition == "kontext":
        return
    if s.strength is None:
        s.strength = 1.0 if condition == "fill" else DEFAULT_STRENGTH
    elif not 0 < s.strength <= 1:
        raise w.fail(
            f"{w.name('strength')} must be in (0, 1], got {s.strength:g} (1.0 repaints everything, "
            "as pure noise; near 0 keeps the image)"
        )
    if s.steps is not None and s.steps * s.strength < 1:  # only then can no step remain: import MLX then
        from mflux.flux1 import check_img2img_steps

        try:
            check_img2img_steps(s.steps, s.strength, w.name("strength"))
        except InvalidArgument as e:
            raise w.fail(str(e)) from None


def _true_cfg(s: Settings, explicit: set, w: _Where) -> None:
    if "true_cfg" in explicit and s.true_cfg is not None:
        if not s.negative_prompt:
            raise w.fail(
                f"{w.name('true_cfg')} needs {w.name('negative_prompt')} "
                "(true CFG steers away from a negative prompt)"
            )
        if s.true_cfg <= 1:
            raise w.fail(
                f"{w.name('true_cfg')} {s.true_cfg:g} with a negative prompt does nothing: true CFG needs "
                f"a scale above 1 (diffusers would ignore the negative prompt; the default is {DEFAULT_TRUE_CFG:g})"
            )
    if s.negative_prompt and s.true_cfg is None:
        s.true_cfg = DEFAULT_TRUE_CFG
    elif s.true_cfg is not None and (not s.negative_prompt or s.true_cfg <= 1):
        s.notes.append(f"true CFG {s.true_cfg:g} ignored: it needs a negative prompt and a scale above 1")
        s.true_cfg = None


def _lora(path, scale, w: _Where) -> tuple[str, float]:
    scale = _finite(scale, "lora scale", w)
    if not isinstance(path, str | os.PathLike):
        raise w.fail(f"a LoRA path must be text, got {path!r}")
    p = Path(path)
    if not p.is_file():
        p = _stored_lora(str(path), w)
    try:
        n, _ = _lora_header(str(p.resolve()))
    except MfluxError as e:
        raise w.fail(str(e)) from None
    if n == 0:
        raise w.fail(f"{path} is not a LoRA: none of its tensors is a LoRA layer of FLUX.1")
    return str(p.resolve()), scale  # absolute, so that --from finds it from any folder


def _stored_lora(name: str, w: _Where) -> Path:
    # a LoRA in the store by name (mflux pull canny-lora), as --lora-paths canny-lora gives it
    from mflux.store import NotStored, Store

    try:
        found = Store().lora_file(name)
    except NotStored as e:
        raise w.fail(str(e)) from None
    if found is None:
        raise w.fail(f"LoRA {name}: no such file")
    return found


_LORA_CACHE: dict[tuple[str, int], tuple[int, int | None]] = {}


def _lora_header(path: str) -> tuple[int, int | None]:
    """(LoRA modules, the input width of its img_in module or None) from a LoRA file's header."""
    # a prompt file names the same LoRA on many lines: read each header once
    key = (path, Path(path).stat().st_mtime_ns)
    if key not in _LORA_CACHE:
        from mflux.runtime.lora import img_in_width, open_lora

        lora = open_lora(path)
        lora.file.close()
        _LORA_CACHE[key] = len(lora.modules), img_in_width(lora)
    return _LORA_CACHE[key]


def loras(paths: list[str] | None, scales: list[float] | None) -> list[tuple[str, float]]:
    """`--lora-paths` and `--lora-scales` as (path, scale) pairs; scales default to 1.0."""
    paths, scales = list(paths or []), list(scales or [])
    if scales and len(scales) != len(paths):
        raise InvalidArgument(
            f"got {len(paths)} LoRA paths but {len(scales)} scales (give one --lora-scales value per LoRA)"
        )
    return list(zip(paths, scales or [1.0] * len(paths)))


def random_seeds(n: int) -> list[int]:
    if not _is_int(n) or n < 1:
        raise InvalidArgument(f"-n must be at least 1, got {n!r}")
    return [secrets.randbelow(RANDOM_SEED_BELOW) for _ in range(n)]


def check_output(path: str | Path) -> Path:
    """The `--output` file: a .png in a folder that exists and is writable (a missing folder is refused,
    not made: a typo would scatter images into a new tree). An existing file is not replaced: mflux writes
    the next free name beside it (metadata.free_path)."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise InvalidArgument(f"--output {path}: mflux writes PNG images; use a name ending in .png")
    if p.is_dir():
        raise InvalidArgument(f"--output {path} is a folder; give a file name such as {p / 'image.png'}")
    parent = p.parent
    if not parent.exists():
        raise InvalidArgument(
            f"--output {path}: no such folder {parent} (create it first: mkdir -p {parent})"
        )
    if not parent.is_dir():
        raise InvalidArgument(f"--output {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"--output {path}: cannot write in {parent} (permission denied)")
    return p


# --- prompt files ---------------------------------------------------------------------------------

PROMPT_FILE_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "seeds",
    "steps",
    "width",
    "height",
    "guidance",
    "true_cfg",
    "image",
    "mask",
    "strength",
    "expand",
    "control",
    "loras",
)


def read_prompt_file(
    path: str | Path, base: Settings, explicit: Iterable[str] = (), variant: str = "schnell"
) -> list[Settings]:
    """Every generation of a prompt file, checked: one prompt a line, or a JSON object a line (JSONL)
    with per-line settings that override `base` (the command's flags). Blank lines and lines starting
    with `#` are skipped; relative paths are relative to the file's folder. Raises InvalidArgument
    naming the first bad line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgument(f"--prompt-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"--prompt-file {path}: cannot read it as UTF-8 text ({e})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{p.name} line {n}: "
        given, keys = _line_settings(line, p.parent, where)
        s = replace(base, **given, source=f"{p.name}:{n}")
        out.append(check(s, set(explicit) | keys, where, variant))
    if not out:
        raise InvalidArgument(f"--prompt-file {path} holds no prompts (one a line, or JSON objects)")
    return out


def _line_settings(line: str, folder: Path, where: str) -> tuple[dict, set]:
    if not line.startswith("{"):
        return {"prompt": line}, {"prompt"}
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where}not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}a JSON line must be an object with a prompt")
    unknown = sorted(set(obj) - set(PROMPT_FILE_KEYS))
    if unknown:
        raise InvalidArgument(f"{where}unknown key {unknown[0]!r} (known: {', '.join(PROMPT_FILE_KEYS)})")
    if "seed" in obj and "seeds" in obj:
        raise InvalidArgument(f"{where}give seed or seeds, not both")
    given = {k: v for k, v in obj.items() if k not in ("seed", "seeds", "loras")}
    if "seed" in obj:
        given["seeds"] = [obj["seed"]]
    elif "seeds" in obj:
        if not isinstance(obj["seeds"], list) or not obj["seeds"]:
            raise InvalidArgument(f"{where}seeds must be a non-empty list of whole numbers")
        given["seeds"] = obj["seeds"]
    for key in ("image", "mask", "control"):
        if isinstance(obj.get(key), str):
            given[key] = str(folder / obj[key])
    if "loras" in obj:
        given["loras"] = _line_loras(obj["loras"], folder, where)
    keys = set(given) | ({"true_cfg"} if "true_cfg" in obj else set())
    return given, keys


def _line_loras(value, folder: Path, where: str) -> list[tuple[str, float]]:
    """`"loras": ["a.safetensors", {"path": "b.safetensors", "scale": 0.5}, ["c.safetensors", 0.8]]`"""
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}loras must be a list of paths or {{path, scale}} objects")
    out = []
    for item in value:
        if isinstance(item, str):
            path, scale = item, 1.0
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and set(item) <= {"path", "scale"}:
            path, scale = item["path"], item.get("scale", 1.0)
        elif isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
            path, scale = item
        else:
            raise InvalidArgument(
                f'{where}bad LoRA entry {item!r} (a path, or {{"path": ..., "scale": ...}})'
            )
        out.append((str(folder / path), scale))
    return out


@dataclass
class Job:
    """One image: its settings, its seed, and its position among all the images of the command."""

    settings: Settings
    seed: int
    index: int


def jobs(generations: list[Settings]) -> list[Job]:
    """One Job per image: each generation's seeds in order."""
    out = []
    for s in generations:
        out += [Job(s, seed, len(out) + i) for i, seed in enumerate(s.seeds)]
    return out


def groups(jobs: list[Job]) -> list[list[Job]]:
    """The jobs whose settings allow them to be denoised together (Settings.batch_key), in the order
    of each group's first job. Prompts and negative prompts may differ within a group."""
    out: dict[tuple, list[Job]] = {}
    for j in jobs:
        out.setdefault(j.settings.batch_key(), []).append(j)
    return list(out.values())


# --- settings from an image -----------------------------------------------------------------------


@dataclass(frozen=True)
class Cfg:
    guidance: float | None  # dev's distilled guidance
    true_cfg: float | None
    note: str | None = None  # why a CFG scale was ignored


def a1111_cfg(cfg_scale: float | None, distilled_cfg_scale: float | None, negative_prompt: str | None) -> Cfg:
    """The one mapping of A1111/Forge CFG fields onto mflux's, for `--from` and the A1111 API:
    `Distilled CFG Scale` is dev's guidance; `CFG scale` is true CFG only when it is above 1 and the
    negative prompt is non-empty, otherwise it is ignored with a note. No usage error here: an A1111
    request may carry `CFG scale: 7` with no negative prompt."""
    for name, v in (("CFG scale", cfg_scale), ("Distilled CFG Scale", distilled_cfg_scale)):
        if v is not None and (isinstance(v, bool) or not math.isfinite(v)):
            raise InvalidArgument(f"{name} must be a finite number, got {v!r}")
    guidance = None if distilled_cfg_scale is None else float(distilled_cfg_scale)
    if cfg_scale is None:
        return Cfg(guidance, None)
    if cfg_scale > 1 and negative_prompt and negative_prompt.strip():
        return Cfg(guidance, float(cfg_scale))
    why = "a scale of 1 or less is no CFG" if cfg_scale <= 1 else "true CFG needs a negative prompt"
    return Cfg(guidance, None, f"CFG scale {cfg_scale:g} ignored ({why})")


# A1111's own pattern for one `Key: value` of the parameters line; values with , : or " are JSON-quoted
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, str]:
    """A1111's `parameters` text: {"prompt", "negative_prompt", and each `Key` of the last line: value}."""
    lines = text.strip().split("\n")
    params = {}
    if lines and len(_A1111_PARAM.findall(lines[-1])) >= 3:
        for key, value in _A1111_PARAM.findall(lines.pop()):
            if value.startswith('"') and value.endswith('"'):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            params[key] = value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip(), **params}


@dataclass
class Recalled:
    """What an earlier image records: Settings fields, the model it was made with, and notes."""

    values: dict
    model: str | None
    source: str  # "mflux metadata", "JSON sidecar" or "A1111 parameters"
    notes: list[str] = field(default_factory=list)
    precision: str | None = None
    model_path: str | None = None  # the folder it was made from (`--path`), where that was not a store model
    redux_model: str | None = None  # the Redux store entry or folder its --redux images went through


def read_image_settings(path: str | Path) -> Recalled:
    """The settings recorded in an image made by mflux or another tool, or in mflux's JSON sidecar."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"--from {path}: no such file")
    if p.suffix.lower() == ".json":
        return _from_mflux(_json_file(p), "JSON sidecar")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            text, pixels = dict(getattr(im, "text", {}) or im.info), im.size
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidArgument(f"--from {path}: not an image or a JSON sidecar ({e})") from None
    if "mflux" in text:
        try:
            return _from_mflux(json.loads(text["mflux"]), "mflux metadata")
        except (json.JSONDecodeError, TypeError):
            pass  # damaged: fall through to the sidecar or the A1111 text
    sidecar = p.with_suffix(".json")
    if sidecar.is_file():
        return _from_mflux(_json_file(sidecar), "JSON sidecar")
    if isinstance(text.get("parameters"), str):
        return _from_a1111(text["parameters"], pixels, p)
    raise InvalidArgument(
        f"--from {path}: no generation settings found (no mflux metadata, JSON sidecar or A1111 parameters)"
    )


def _json_file(p: Path) -> dict:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"--from {p}: not a valid JSON sidecar ({e})") from None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise InvalidArgument(f"--from {p}: not an mflux JSON sidecar (it has no prompt)")
    return obj


def _from_mflux(m: dict, source: str) -> Recalled:
    values = {
        "prompt": m.get("prompt"),
        "negative_prompt": m.get("negative_prompt"),
        "seeds": [m["seed"]] if m.get("seed") is not None else [],
        "steps": m.get("steps"),
        "width": m.get("width"),
        "height": m.get("height"),
        "guidance": m.get("guidance"),
        "true_cfg": m.get("true_cfg_scale", m.get("true_cfg")),
        "image": m.get("image_path"),
        "mask": m.get("mask_path"),
        "strength": m.get("strength"),
        "expand": m.get("expand"),
        "control": m.get("control_path"),
        "control_sha256": m.get("control_sha256"),
        "control_from": m.get("control_from_path"),
        "control_from_sha256": m.get("control_from_sha256"),
        "canny": bool(m.get("canny_thresholds")) or None,
        "canny_thresholds": tuple(m["canny_thresholds"]) if m.get("canny_thresholds") else None,
        "image_sha256": m.get("image_sha256"),
        "mask_sha256": m.get("mask_sha256"),
        "loras": list(zip(m.get("lora_paths") or [], m.get("lora_scales") or [])),
        "redux": m.get("redux_images"),
        "redux_scales": m.get("redux_scales"),
        "redux_sha256": m.get("redux_sha256"),
    }
    values = {k: v for k, v in values.items() if v not in (None, [])}
    if m.get("redux_images") and m.get("redux_prompt") is False:
        values.pop("prompt", None)  # Redux from the images alone: not the encoding of an empty prompt
    if m.get("variant") == "schnell":
        values.setdefault("guidance", None)  # schnell has none: not a missing setting
    return Recalled(
        values,
        m.get("model"),
        source,
        precision=m.get("precision"),
        model_path=m.get("model_path"),
        redux_model=m.get("redux_model"),
    )


def _from_a1111(text: str, pixels: tuple[int, int], path: Path) -> Recalled:
    a = parse_a1111(text)
    values = {"prompt": a["prompt"]}
    notes = []
    if a["negative_prompt"]:
        values["negative_prompt"] = a["negative_prompt"]
    if "Seed" in a:
        values["seeds"] = [_number(a, "Seed", int, path)]
    if "Steps" in a:
        values["steps"] = _number(a, "Steps", int, path)
    if m := re.fullmatch(r"(\d+)x(\d+)", a.get("Size", "")):
        width, height = int(m[1]), int(m[2])
        values["width"], values["height"] = max(16, width // 16 * 16), max(16, height // 16 * 16)
        if (width, height) != (values["width"], values["height"]):
            notes.append(
                f"size {values['width']}x{values['height']}: {a['Size']} rounded down to multiples of 16"
            )
    elif pixels[0] % 16 == 0 and pixels[1] % 16 == 0:
        values["width"], values["height"] = pixels
        notes.append(f"size {pixels[0]}x{pixels[1]}, from the image's pixels")
    # `Guidance:` is what mflux 0.1 wrote for dev's guidance
    distilled = next((k for k in ("Distilled CFG Scale", "Guidance") if k in a), None)
    cfg = a1111_cfg(
        _number(a, "CFG scale", float, path) if "CFG scale" in a else None,
        _number(a, distilled, float, path) if distilled else None,
        a["negative_prompt"],
    )
    if cfg.guidance is not None:
        values["guidance"] = cfg.guidance
    if cfg.true_cfg is not None:
        values["true_cfg"] = cfg.true_cfg
    notes += [cfg.note] if cfg.note else []
    if "Denoising strength" in a:
        values["strength"] = _number(a, "Denoising strength", float, path)
    return Recalled(values, a.get("Model"), "A1111 parameters", notes)


def _number(a: dict, key: str, kind, path: Path):
    try:
        return kind(a[key])
    except ValueError:
        raise InvalidArgument(
            f"--from {path}: {key} {a[key]!r} in its A1111 parameters is not a number"
        ) from None


# Fields the user is told were taken from the defaults when an image lacks them.
_REPORTED = ("prompt", "seeds", "steps", "width", "height", "guidance")


def recall(
    path: str | Path,
    given: dict,
    explicit: Iterable[str] = (),
    variant: str = "schnell",
    r: Recalled | None = None,
) -> tuple[Settings, Recalled, list[str]]:
    """Settings for `--from`: what the image records, overridden by the explicitly given `given` values
    (Settings fields), checked. Returns (settings, what the image records, notes for the user).

    An img2img or inpaint image needs its init image and mask, unchanged, unless --image/--mask replace
    them; a mask recorded without its image being kept is dropped with the image. `r`: the image's
    settings when the caller has read them already."""
    r = r or read_image_settings(path)
    explicit = set(explicit)
    values = {k: v for k, v in r.values.items() if k not in explicit}
    if "image" in explicit:  # a new init image: the recorded mask and hashes belong to the old one
        for k in ("mask", "expand", "image_sha256", "mask_sha256"):
            values.pop(k, None)
    _check_init_files(path, values)
    if "strength" in values and "image" not in values and "image" not in explicit:
        r.notes.append(f"strength {values.pop('strength'):g} ignored: the image records no init image")
    notes = [f"settings from {path} ({r.source})", *r.notes]
    # Redux from the images alone has no prompt: not a missing one
    reported = [k for k in _REPORTED if not (k == "prompt" and values.get("redux"))]
    defaulted = [FLAGS[k] for k in reported if k not in values and k not in explicit]
    if defaulted:
        notes.append(f"{path} lacks {', '.join(defaulted)}: using the defaults")
    if "control" in explicit:  # a new map: the recorded one and the photo a map was computed from go
        for k in ("control_sha256", "control_from", "control_from_sha256", "canny", "canny_thresholds"):
            values.pop(k, None)
    if "control_from" in explicit:
        for k in ("control", "control_sha256", "control_from_sha256"):
            values.pop(k, None)
    if "redux" in explicit:  # new images: the recorded hashes, and scales unless given, were the old ones
        for k in ("redux_sha256", *(() if "redux_scales" in explicit else ("redux_scales",))):
            values.pop(k, None)
    if "mask" in explicit:  # a mask replaces a recorded outpainting border
        values.pop("expand", None)
    s = check(
        Settings(**{**values, **{k: given[k] for k in explicit if k in given}}), explicit, variant=variant
    )
    return s, r, notes + s.notes


def _check_init_files(path, values: dict) -> None:
    files = (("image", "init image"), ("mask", "mask"), ("control", "control image"))
    for key, name in (*files, ("control_from", "control photo")):
        if values.get(key) is None:
            continue
        f, want = Path(values[key]), values.get(f"{key}_sha256")
        if not f.is_file():
            raise InvalidArgument(
                f"--from {path}: its {name} {f} is missing (restore it, or give {FLAGS[key]} PATH)"
            )
        if want and sha256(f) != want:
            raise InvalidArgument(
                f"--from {path}: its {name} {f} has changed since (sha256 differs; "
                f"give {FLAGS[key]} {f} to use it as it is now)"
            )
    for f, want in zip(values.get("redux") or [], values.get("redux_sha256") or []):
        if not Path(f).is_file():
            raise InvalidArgument(
                f"--from {path}: its Redux image {f} is missing (restore it, or give --redux)"
            )
        if sha256(f) != want:
            raise InvalidArgument(
                f"--from {path}: its Redux image {f} has changed since (sha256 differs; give --redux again "
                "to use the images as they are now)"
            )


def as_dict(s: Settings) -> dict:
    return {k: v for k, v in asdict(s).items() if k != "notes"}
