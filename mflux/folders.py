"""Open a model for the runtime: a stored model through its manifest, or any folder through its config
files. The toolchain side of `mflux.runtime.folder`: it reads manifests and the catalog and passes the
variant and its defaults in, so the runtime never does."""

from pathlib import Path

from mflux.errors import MfluxError
from mflux.manifest import MANIFEST, defaults_for, read_manifest
from mflux.runtime.folder import ModelFolder, detect_variant, read_architecture


def open_folder(path: str | Path, name: str | None = None, variant: str | None = None) -> ModelFolder:
    """Describe a model folder: from its manifest.toml if it has one, else from its config files (the
    variant from the architecture, or `variant` where the architecture can't tell)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MfluxError(f"{path}: no such folder (give a FLUX.1 model folder, or a store name with --model)")
    if (path / MANIFEST).is_file():
        m = read_manifest(path)
        if variant not in (None, m.variant):
            raise MfluxError(f"{m.name} is a {m.variant} model; drop --variant {variant}")
        defaults = m.defaults or defaults_for(m.variant, m.architecture)
        return ModelFolder(path, m.format, m.variant, m.architecture, m.quantization, m.name, defaults)
    arch = read_architecture(path)
    found = detect_variant(arch, variant)
    return ModelFolder(path, "hf", found, arch, None, name or path.name, defaults_for(found, arch))
