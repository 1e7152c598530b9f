"""The known models: one TOML file each in `manifests/`, shipped inside the wheel as mflux.manifests."""

from dataclasses import dataclass, fields
from functools import cache
from importlib import resources

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mflux.errors import MfluxError


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str  # Hugging Face repo id
    revision: str  # the pinned commit
    gated: bool
    license: str
    license_url: str
    description: str
    allow_patterns: tuple[str, ...]  # what a pull downloads: the diffusers folders and model_index.json
    download_size_bytes: int  # approximate
    size_estimated: bool  # the size is a guess (from another model's), not read from the repo's files
    defaults: dict  # steps, guidance, max_sequence_length (+ shift settings for dev); empty for a LoRA
    kind: str = "model"  # or "lora": one LoRA file (allow_patterns names it), stored for --lora-paths


@cache
def catalog() -> dict[str, CatalogEntry]:
    """Name -> entry for every `*.toml` in mflux.manifests."""
    entries = {}
    for f in sorted(resources.files("mflux.manifests").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".toml"):
            entry = _entry(f.name, tomllib.loads(f.read_text(encoding="utf-8")))
            entries[entry.name] = entry
    return entries


def _entry(filename: str, data: dict) -> CatalogEntry:
    names = [f.name for f in fields(CatalogEntry)]
    missing = [n for n in names if n not in data and n != "kind"]
    if missing:
        raise MfluxError(f"catalog file {filename} lacks {', '.join(missing)} (reinstall mflux)")
    values = {n: data[n] for n in names if n in data}
    values["allow_patterns"] = tuple(values["allow_patterns"])
    return CatalogEntry(**values)
