"""Open a model for the runtime: a stored model through its manifest, or any folder through its config
files. The toolchain side of `mflux.runtime.folder`: it reads manifests and the catalog and passes the
variant and its defaults in, so the runtime never does.

A stored model's files are checked cheaply each time it is opened: every file the manifest lists must
exist with its recorded size, and one whose mtime is newer than the manifest trusts (a file edited, or
every file of a copied store) is hashed, and the manifest re-stamped once all match. That catches a
truncated, deleted or edited file, not a byte flipped in place without changing the mtime;
`verify=True` (`mflux run --verify`, `mflux inspect --verify`) re-hashes every file.
"""

import sys
from datetime import datetime, timezone
from pathlib import Path

from mflux.errors import MfluxError
from mflux.manifest import (
    MANIFEST,
    REDUX,
    Manifest,
    defaults_for,
    not_a_pipeline,
    read_manifest,
    remake_command,
    sha256_file,
    stamp_checked,
    trusted_until,
)
from mflux.runtime.folder import ModelFolder, detect_variant, read_architecture
from mflux.store import file_on_disk


def open_folder(
    path: str | Path, name: str | None = None, variant: str | None = None, verify: bool = False
) -> ModelFolder:
    """Describe a model folder: from its manifest.toml if it has one (its files checked, and re-hashed
    under `verify`), else from its config files (the variant from the architecture, or `variant` where
    the architecture can't tell)."""
    path = Path(path).expanduser()
    try:  # a name too long for the file system is one clear error (is_dir would raise it)
        path.exists()
    except OSError as e:
        raise MfluxError(f"{str(path)[:80]}...: not a valid path ({e.strerror})") from None
    if not path.is_dir():
        raise MfluxError(f"{path}: no such folder (give a FLUX.1 model folder, or a store name with --model)")
    if (path / MANIFEST).is_file():
        m = read_manifest(path)
        if m.variant == REDUX:
            raise not_a_pipeline(m.name)
        if m.kind == "lora":  # convert, quantize, serve or a run given a stored LoRA's folder
            raise MfluxError(
                f"{m.name} is a LoRA, not a model: load it on dev (mflux run -m dev --lora-paths {m.name})"
            )
        if variant not in (None, m.variant):
            raise MfluxError(f"{m.name} is a {m.variant} model; drop --variant {variant}")
        check_files(path, m, verify)
        defaults = m.defaults or defaults_for(m.variant, m.architecture)
        return ModelFolder(path, m.format, m.variant, m.architecture, m.quantization, m.name, defaults)
    if verify:
        raise MfluxError(f"{path} has no manifest, so there are no hashes to verify against; drop --verify")
    arch = read_architecture(path)
    found = detect_variant(arch, variant)
    return ModelFolder(path, "hf", found, arch, None, name or path.name, defaults_for(found, arch))


def check_files(folder: Path, m: Manifest, verify: bool = False) -> None:
    """Refuse a stored model whose files are missing, not regular files, of the wrong size, or of the
    wrong sha256. Only files newer than the manifest trusts are hashed (every file under `verify`); when
    they all match, the manifest records it, so a copied store is hashed once, not at every open."""
    fix = f"check it with: mflux inspect {m.name} --verify, then make it again: {remake_command(m)}"
    started = datetime.now(timezone.utc)
    trusted = trusted_until(m)
    newer = []
    for f in m.files:
        st, problem = file_on_disk(folder, f)
        if problem:
            raise MfluxError(f"{m.name} is damaged: {problem} ({fix})")
        if verify or st.st_mtime > trusted:
            newer.append(f)
    if newer and not verify:
        print(
            f"note: {m.name}: {_files(len(newer))} newer than its manifest (a copied store?); checking "
            "their sha256 once",
            file=sys.stderr,
        )
    for f in newer:
        if sha256_file(folder / f["path"]) != f["sha256"]:
            raise MfluxError(f"{m.name} is damaged: {f['path']} does not match its sha256 ({fix})")
    if newer:
        stamp_checked(folder, m, started)


def _files(n: int) -> str:
    return f"{n} files are" if n > 1 else "1 file is"
