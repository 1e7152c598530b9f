"""Generation parameters inside the PNG: one text chunk per field (exiftool shows them), plus a
`parameters` chunk in the AUTOMATIC1111 web UI's format, which image sites and tools read."""

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from mflux import __version__
from mflux.errors import MfluxError

# PNG text chunk keyword -> metadata key. Keywords are what exiftool prints as tag names; add_text
# writes tEXt (what the A1111 web UI writes) and falls back to iTXt for non-Latin-1 text.
_FIELDS = {
    "Prompt": "prompt",
    "Model": "model",
    "Variant": "variant",
    "ModelPath": "model_path",
    "Seed": "seed",
    "Steps": "steps",
    "Guidance": "guidance",
    "NegativePrompt": "negative_prompt",
    "TrueCFG": "true_cfg_scale",
    "Strength": "strength",
    "InitImage": "image_path",
    "InitImageSHA256": "image_sha256",
    "Mask": "mask_path",
    "MaskSHA256": "mask_sha256",
    "ControlImage": "control_path",
    "ControlImageSHA256": "control_sha256",
    "ControlFrom": "control_from_path",
    "ControlFromSHA256": "control_from_sha256",
    "CannyThresholds": "canny_thresholds_text",
    "ReduxImages": "redux_images_text",
    "ReduxSHA256": "redux_sha256_text",
    "ReduxScales": "redux_scales_text",
    "ReduxModel": "redux_model",
    "Expand": "expand_margins",
    "ReferenceSize": "reference_size_text",
    "PromptFileLine": "prompt_file_line",
    "Size": "size",
    "Quantization": "quantization",
    "LoRAs": "loras",
    "Precision": "precision",
    "DenoisingSeconds": "denoising_seconds",
    "Software": "software",
}


def full_metadata(metadata: dict) -> dict:
    """The generation record as written: adds size, LoRAs, the denoising time and the mflux version."""
    m = dict(metadata)
    m["size"] = f"{m.get('width')}x{m.get('height')}"
    m["loras"] = (
        ", ".join(f"{p}:{s:g}" for p, s in zip(m.get("lora_paths", []), m.get("lora_scales", []))) or None
    )
    m["denoising_seconds"] = (m.get("timings") or {}).get("denoising")
    if m.get("expand"):  # outpainting's margins, as --expand takes them
        m["expand_margins"] = ",".join(map(str, m["expand"]))
    if m.get("reference_size"):  # Kontext's reference as the transformer saw it
        m["reference_size_text"] = "x".join(map(str, m["reference_size"]))
    if m.get("canny_thresholds"):  # the edge detector's, as --canny-thresholds takes them
        m["canny_thresholds_text"] = ",".join(f"{v:g}" for v in m["canny_thresholds"])
    if m.get("redux_images"):  # one entry per --redux image
        m["redux_images_text"] = ", ".join(m["redux_images"])
        m["redux_sha256_text"] = ", ".join(m["redux_sha256"])
        m["redux_scales_text"] = ",".join(f"{v:g}" for v in m["redux_scales"])
    m["software"] = f"mflux {__version__}"
    m["mflux_version"] = __version__
    return m


def a1111_parameters(m: dict) -> str:
    """`<prompt>\\nNegative prompt: <text>\\nSteps: 4, Sampler: Euler, Seed: 2, Size: 1024x1024, ...`

    `CFG scale` is the true-CFG scale (1 is none, as Forge writes for FLUX) and `Distilled CFG Scale` is
    dev's guidance, the names Forge gives them; settings.a1111_cfg reads them back."""
    fields = [
        ("Steps", m.get("steps")),
        ("Sampler", "Euler"),
        ("Schedule type", "flow-matching"),
        ("CFG scale", m.get("true_cfg_scale") or 1),
        ("Distilled CFG Scale", m.get("guidance")),
        ("Seed", m.get("seed")),
        ("Size", m.get("size")),
        ("Denoising strength", m.get("strength")),
        ("Model", m.get("model")),
        ("Quantization", m.get("quantization")),
        ("LoRAs", m.get("loras")),
        ("Version", f"mflux {__version__}"),
    ]
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None)
    negative = f"\nNegative prompt: {m['negative_prompt']}" if m.get("negative_prompt") else ""
    return f"{m.get('prompt', '')}{negative}\n{line}"


def _quote(value) -> str:
    # A1111's own rule: a value holding a comma, colon, quote or newline is written as a JSON string
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def free_path(path: Path) -> Path:
    """`path`, or the first of `<stem>_1<ext>`, `<stem>_2<ext>`, ... that does not exist."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def save_png(image: Image.Image, path: Path, metadata: dict, export_json: bool, overwrite: bool) -> Path:
    """Write the image (and `<stem>.json` if asked); returns the path written, never replacing a file
    unless `overwrite`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MfluxError(f"{path}: mflux writes PNG images; use a .png file name")
    if not overwrite:
        path = free_path(path)
    m = full_metadata(metadata)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG", pnginfo=png_info(metadata))
        os.replace(tmp, path)
        if export_json:
            sidecar = path.with_suffix(".json")
            tmp = sidecar.with_name(f".{sidecar.name}.tmp")
            tmp.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, sidecar)
    except OSError as e:
        raise MfluxError(f"cannot write {path}: {e.strerror}") from None
    return path


def png_info(metadata: dict) -> PngImagePlugin.PngInfo:
    """The PNG text chunks for a generation record: one per field, A1111's `parameters`, and `mflux`
    (the whole record as JSON)."""
    m = full_metadata(metadata)
    info = PngImagePlugin.PngInfo()
    for keyword, key in _FIELDS.items():
        if m.get(key) is not None:
            info.add_text(keyword, str(m[key]))
    info.add_text("parameters", a1111_parameters(m))
    info.add_text("mflux", json.dumps(m, sort_keys=True))
    return info


def read_png_metadata(path: str | Path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)
