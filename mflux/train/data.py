"""The training data: a folder of images with captions, checked up front, encoded once and cached.

Two layouts, as kohya/ai-toolkit and Hugging Face's imagefolder lay them out:
- `photo1.png` beside `photo1.txt` (the caption), for every image;
- `metadata.jsonl`, one `{"file_name": "photo1.png", "text": "..."}` per line ("caption" or "prompt"
  also name the caption).

Every image is resized so its short side is the resolution, then centre-cropped to a square, as
diffusers' train_dreambooth_lora_flux.py does by default (Lanczos, `--center_crop`). One shape means
one compiled step and no bucket bookkeeping; the cost is that a wide image loses its sides.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mflux.errors import MfluxError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str  # with the trigger word prepended


def scan(data: str | Path, trigger: str | None = None) -> list[Example]:
    """The folder's (image, caption) pairs, every image opened and decoded once, so a bad image or a
    missing caption is reported by its file name before anything is loaded or encoded."""
    folder = Path(data).expanduser()
    if folder.is_file() and folder.suffix == ".jsonl":  # the metadata file itself: its folder's images
        pairs, folder = _from_metadata(folder), folder.parent
    elif folder.is_file():
        raise MfluxError(
            f"{folder}: a file, not a data folder (give the folder that holds the images and their "
            f".txt captions: --data {folder.parent})"
        )
    elif not folder.is_dir():
        raise MfluxError(f"{folder}: no such data folder (give a folder of images with .txt captions)")
    elif (folder / "metadata.jsonl").is_file():
        pairs = _from_metadata(folder / "metadata.jsonl")
    else:
        pairs = _from_captions(folder)
    if not pairs:
        raise MfluxError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the data folder "
            "(put images there with same-named .txt captions, or a metadata.jsonl)"
        )
    for image, _ in pairs:
        _check_image(image)
    prefix = f"{trigger.strip()} " if trigger and trigger.strip() else ""
    return [Example(image, (prefix + caption.strip()).strip()) for image, caption in pairs]


def _from_captions(folder: Path) -> list[tuple[Path, str]]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    pairs = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise MfluxError(f"{image}: no caption file {caption.name} (write one beside each image)")
        pairs.append((image, caption.read_text(encoding="utf-8")))
    return pairs


def _from_metadata(path: Path) -> list[tuple[Path, str]]:
    pairs = []
    folder = path.parent  # file_name is relative to it
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MfluxError(
                f'{path}:{n}: not a JSON object with a "file_name" (imagefolder layout)'
            ) from None
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), None)
        if caption is None:
            raise MfluxError(f"{path}:{n}: {name} has no caption (a {' or '.join(CAPTION_KEYS)} field)")
        image = folder / name
        if not image.is_file():
            raise MfluxError(f"{path}:{n}: {image} does not exist")
        pairs.append((image, caption))
    return pairs


def _check_image(path: Path) -> None:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many kinds for a truncated or foreign file
        raise MfluxError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def load_image(path: Path, resolution: int) -> np.ndarray:
    """(resolution, resolution, 3) uint8: short side resized to the resolution (Lanczos), then
    centre-cropped."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.LANCZOS)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        return np.asarray(im, dtype=np.uint8)


def cache_key(examples: list[Example], model: str, resolution: int, seq_len: int, prompts: list[str]) -> str:
    """What the cached latents and embeddings depend on: the files' bytes, captions and settings."""
    h = hashlib.sha256(json.dumps([model, resolution, seq_len, prompts]).encode())
    for e in examples:
        h.update(e.caption.encode() + b"\0" + hashlib.sha256(e.image.read_bytes()).digest())
    return h.hexdigest()
