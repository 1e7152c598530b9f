"""What the runtime knows about a model folder before loading any weights, and the FLUX.1 variants.

The runtime reads a diffusers folder's own config files (`read_architecture`); the toolchain reads a
stored model's manifest instead and builds the same `ModelFolder`, passing the variant and its defaults
in. A new FLUX.1 variant is one row of VARIANTS plus its conditioning code in the engine.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from mflux.errors import MfluxError
from mflux.runtime.quantization import QuantSpec

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
CONFIG_FILES = {
    "transformer": "transformer/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "vae": "vae/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
REDUX_CONFIG_FILES = {
    "image_encoder": "image_encoder/config.json",
    "image_embedder": "image_embedder/config.json",
    "feature_extractor": "feature_extractor/preprocessor_config.json",
}


@dataclass(frozen=True)
class Variant:
    """A FLUX.1 variant as the runtime sees it: how to recognise its transformer, and how the engine
    conditions it (`engine.Request.condition`)."""

    name: str
    guidance_embeds: bool  # dev-style distilled guidance is an input of the transformer
    in_channels: int = (
        64  # packed channels the transformer takes: latents, plus Fill's (320) or Control's (64)
    )
    pipeline: str = "FluxPipeline"  # diffusers' pipeline class, model_index.json's _class_name
    condition: str = "text"  # what the engine feeds it besides the prompt (see engine's docstring)
    told_by: str = "architecture"  # or "pipeline": only the pipeline class tells it from another row's
    # shapes (Kontext from dev); or "name": nothing in the files does (Krea is dev's), only its name

    def matches(self, transformer_config: dict) -> bool:
        return (
            bool(transformer_config.get("guidance_embeds", False)) == self.guidance_embeds
            and int(transformer_config.get("in_channels", 64)) == self.in_channels
        )


VARIANTS = {
    v.name: v
    for v in (
        Variant("schnell", guidance_embeds=False),
        Variant("dev", guidance_embeds=True),
        Variant(
            "kontext",
            guidance_embeds=True,
            pipeline="FluxKontextPipeline",
            condition="kontext",
            told_by="pipeline",
        ),
        Variant("fill", guidance_embeds=True, in_channels=384, pipeline="FluxFillPipeline", condition="fill"),
        Variant("krea", guidance_embeds=True, told_by="name"),
        # Canny and Depth share shapes and pipeline class: only a name (the catalog's, --variant) tells them
        Variant(
            "canny",
            guidance_embeds=True,
            in_channels=128,
            pipeline="FluxControlPipeline",
            condition="control",
        ),
        Variant(
            "depth",
            guidance_embeds=True,
            in_channels=128,
            pipeline="FluxControlPipeline",
            condition="control",
        ),
    )
}


def detect_variant(architecture: dict, variant: str | None = None) -> str:
    """The variant of an architecture: `variant` when given (checked against the transformer's config),
    else the one row that fits the transformer and the folder's pipeline class. Where they can't tell
    (a Kontext single file has dev's exact shapes and no pipeline class), the plain row is taken: dev."""
    transformer = architecture.get("transformer", {})
    if variant is not None:
        if variant not in VARIANTS:
            raise MfluxError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        if not VARIANTS[variant].matches(transformer):
            raise MfluxError(
                f"the transformer's config does not fit variant {variant!r} (guidance_embeds="
                f"{transformer.get('guidance_embeds')}, in_channels={transformer.get('in_channels')}): "
                f"drop --variant {variant}, or give the {variant} model"
            )
        return variant
    fits = [v for v in VARIANTS.values() if v.matches(transformer)]
    pipeline = architecture.get("pipeline", {}).get("class_name")
    found = [v for v in fits if v.told_by == "pipeline" and v.pipeline == pipeline]
    found = found or [v for v in fits if v.told_by == "architecture"]
    if not found:
        raise MfluxError(
            "the transformer's config fits no known FLUX.1 variant "
            f"(guidance_embeds={transformer.get('guidance_embeds')}, in_channels={transformer.get('in_channels')})"
        )
    if len(found) > 1:
        raise MfluxError(
            f"the architecture can't tell {' from '.join(v.name for v in found)}: name it with --variant"
        )
    return found[0].name


def read_architecture(folder: Path) -> dict:
    """The config values of a diffusers-layout folder, per component, under Hugging Face's key names."""
    folder = Path(folder)
    arch = {}
    for component, rel in CONFIG_FILES.items():
        arch[component] = read_config(folder, rel, component, "a FLUX.1 checkpoint")
    index = folder / "model_index.json"  # which diffusers pipeline: tells Kontext's folder from dev's
    if index.is_file():
        try:
            pipeline = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pipeline = None  # the folder's own configs decide, as for a folder without the file
        if isinstance(pipeline, str):
            arch["pipeline"] = {"class_name": pipeline}
    return arch


def read_redux_architecture(folder: Path) -> dict:
    """The config values of a folder laid out as FLUX.1-Redux-dev (diffusers' FluxPriorReduxPipeline)."""
    folder = Path(folder)
    return {c: read_config(folder, rel, c, "a FLUX.1 Redux folder") for c, rel in REDUX_CONFIG_FILES.items()}


def read_config(folder: Path, rel: str, component: str, what: str) -> dict:
    """`folder/rel`, a JSON object, as `config_values` keeps it; `what` the folder should be."""
    path = folder / rel
    if not path.is_file():
        raise MfluxError(f"{folder} is not {what}: missing {rel} (for {component})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MfluxError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise MfluxError(f"{path}: expected a JSON object")
    return config_values(config)


def config_values(config: dict) -> dict:
    """A config.json as mflux keeps it: without diffusers' bookkeeping keys (_class_name,
    _diffusers_version), and without nulls, which TOML lacks."""
    return _without_nulls({k: v for k, v in config.items() if not k.startswith("_")})


def _without_nulls(value):
    if isinstance(value, dict):
        return {str(k): _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_nulls(v) for v in value if v is not None]
    return value


@dataclass
class ModelFolder:
    """What the runtime needs to know about a folder before loading any weights."""

    path: Path
    format: str  # "hf" | "mlx"
    variant: str  # a key of VARIANTS
    architecture: dict  # component -> config values, under Hugging Face's key names
    quantization: dict | None  # stored quantization (mlx format), per component
    name: str
    defaults: dict  # steps, guidance, max_sequence_length (+ the sigma shift settings where it shifts)

    def quant_spec(self, component: str, layer: str | None = None) -> QuantSpec | None:
        q = (self.quantization or {}).get(component)
        if not q:
            return None
        return QuantSpec.from_dict({**q, **q.get("layers", {}).get(layer, {})} if layer else q)
