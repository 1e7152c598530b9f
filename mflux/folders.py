"""Open a model for the runtime: a stored model through its manifest, or any folder through its config
files. The toolchain side of `mflux.runtime.folder`: it reads manifests and the catalog and passes the
variant and its defaults in, so the runtime never does.

A stored model's files are checked cheaply each time it is opened: every file the manifest lists must
exist with its recorded size and must not have changed since the manifest was written (its mtime is not
newer). That catches a truncated, deleted or edited file, not a byte flipped in place without changing
the mtime; `verify=True` (`mflux run --verify`, `mflux inspect --verify`) re-hashes every file.
"""

from datetime import datetime
from pathlib import Path

from mflux.errors import MfluxError
from mflux.manifest import MANIFEST, Manifest, defaults_for, read_manifest, remake_command, sha256_file
from mflux.runtime.folder import ModelFolder, detect_variant, read_architecture
from mflux.store import file_on_disk

_MTIME_SLACK = 2.0  # seconds: `created` is kept to the second


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
    """Refuse a stored model whose files are missing, not regular files, of the wrong size, changed since
    it was stored, or (under `verify`) of the wrong sha256."""
    fix = f"check it with: mflux inspect {m.name} --verify, then make it again: {remake_command(m)}"
    created = datetime.fromisoformat(m.created).timestamp()
    for f in m.files:
        st, problem = file_on_disk(folder, f)
        if problem:
            raise MfluxError(f"{m.name} is damaged: {problem} ({fix})")
        if verify:
            if sha256_file(folder / f["path"]) != f["sha256"]:
                raise MfluxError(f"{m.name} is damaged: {f['path']} does not match its sha256 ({fix})")
        elif st.st_mtime > created + _MTIME_SLACK:
            raise MfluxError(
                f"{m.name}: {f['path']} changed after the model was stored; check every file's hash with "
                f"--verify (mflux run --verify, or mflux inspect {m.name} --verify)"
            )
