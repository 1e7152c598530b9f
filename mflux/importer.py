"""`mflux import`: add a model folder already on disk (diffusers layout, or MLX-native) to the store as
it is, without copying where the disk allows.

Each file is placed in the store by the cheapest means that leaves the original untouched: a
copy-on-write clone (APFS clonefile, reflink on btrfs/xfs), else a hard link, else a copy (`copy=True`
takes a clone or a copy, never a link). Symlinks (a Hugging Face cache snapshot's, into `blobs/`) are
resolved to the files they name. Nothing is moved or renamed at the source, so a Hugging Face cache
stays whole, and `mflux rm` removes only the store's link or copy. The folder is verified first: its
layout and configs, every safetensors header, every file's sha256 (recorded in the manifest; an
MLX-native folder's files must match its own manifest).
"""

import dataclasses
import errno
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from mflux.catalog import catalog
from mflux.errors import MfluxError
from mflux.folders import open_folder
from mflux.hub import DIFFUSERS_PATTERNS, _wanted
from mflux.manifest import MANIFEST, hash_files, new_manifest, read_manifest, write_manifest
from mflux.runtime.folder import COMPONENTS
from mflux.runtime.loader import folder_source
from mflux.store import Store, StoredModel, format_size, validate_name

_FICLONE = 0x40049409  # Linux's ioctl that clones a file's extents (btrfs, xfs, bcachefs)


def import_model(
    folder: str,
    *,
    name: str | None = None,
    copy: bool = False,
    variant: str | None = None,
    force: bool = False,
    store: Store | None = None,
) -> StoredModel:
    """Add `folder` (a diffusers-layout or MLX-native FLUX.1 folder, a Hugging Face cache snapshot
    included) to the store as `name` (default: the repo's or folder's name), cloned, hard-linked or
    copied file by file (`copy`: never linked). Returns the StoredModel."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise MfluxError(f"{folder}: no such folder (give a FLUX.1 model folder)")
    path = path.resolve()
    store = store or Store()
    store.check_root()
    model = open_folder(path, variant=variant)  # the layout and every config, before anything is written
    name = name or _default_name(path, model.name)
    validate_name(name)
    if store.path(name).resolve() == path:
        raise MfluxError(f"{path} is the store's own {name!r} (choose another folder)")
    for c in COMPONENTS:
        folder_source(path / c).close()  # every header checked
    files = _model_files(path, model.format)
    methods = set()
    with store.build(name, force=force, size_hint=sum(p.stat().st_size for p in files.values())) as tmp:
        for rel, src in files.items():
            methods.add(_place(src, tmp / rel, copy))
        # every file hashed once, where it now is; the build is dropped on a mismatch
        source = {"kind": "path", "path": str(path), "imported": "+".join(sorted(methods))}
        write_manifest(tmp, _manifest(tmp, path, name, model, source))
    stored = store.get(name)
    print(f"stored {name} ({format_size(stored.size_bytes)}, {source['imported']}) in {stored.path}")
    return stored


def _default_name(path: Path, folder_name: str) -> str:
    # A Hugging Face cache snapshot is models--ORG--REPO/snapshots/COMMIT: the repo names it, and a
    # catalog repo gets its catalog name, as a pull would.
    for part in reversed(path.parts):
        if m := re.fullmatch(r"models--(.+?)--(.+)", part):
            repo = f"{m[1]}/{m[2]}"
            return next((e.name for e in catalog().values() if e.repo == repo), m[2])
    return folder_name


def _model_files(folder: Path, fmt: str) -> dict[str, Path]:
    """The files that make the model, as `_files` gives them: a diffusers folder's pipeline files (those
    a pull takes, never a root single file), an MLX-native folder's manifest's files (every one)."""
    files = _files(folder)
    if fmt == "hf":
        return {rel: p for rel, p in files.items() if _wanted(rel, DIFFUSERS_PATTERNS)}
    listed = [f["path"] for f in read_manifest(folder).files]
    missing = [rel for rel in listed if rel not in files]
    if missing:
        raise MfluxError(f"{folder}: {missing[0]} is missing (its manifest lists it): convert it again")
    return {rel: files[rel] for rel in listed}


def _files(folder: Path) -> dict[str, Path]:
    """{relative path: the regular file it is, symlinks resolved}, hidden entries (a download tool's
    `.cache/`) and a manifest left out."""
    out = {}
    for dirpath, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith(".") or (Path(dirpath) == folder and n == MANIFEST):
                continue
            p = Path(dirpath) / n
            try:
                real = p.resolve(strict=True)
            except (OSError, RuntimeError):
                raise MfluxError(f"{p}: a broken symlink (is the download complete?)") from None
            if not real.is_file():
                raise MfluxError(f"{p}: not a regular file")
            out[p.relative_to(folder).as_posix()] = real
    return out


def _manifest(tmp: Path, path: Path, name: str, model, source: dict):
    if model.format == "mlx":
        m = read_manifest(path)
        hashed = {f["path"]: f["sha256"] for f in hash_files(tmp)}
        bad = [f["path"] for f in m.files if hashed[f["path"]] != f["sha256"]]
        if bad:
            raise MfluxError(
                f"{path}: {bad[0]} does not match its manifest's sha256: it is damaged (convert it again)"
            )
        # added now: `created` is what the store's mtime check trusts files against
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return dataclasses.replace(m, name=name, source=source, created=now, checked=None)
    return new_manifest(tmp, name=name, format="hf", dtype=_dtype(path), source=source, variant=model.variant)


def _dtype(folder: Path) -> str:
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    source = folder_source(folder / "transformer")
    try:
        return next((names[source.dtype(k)] for k in source.keys() if source.dtype(k) in names), "float32")
    finally:
        source.close()


def _place(src: Path, dst: Path, copy: bool) -> str:
    """Put `src` at `dst` without touching `src`: a clone, else (unless `copy`) a hard link, else a copy.
    Returns which."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if _clone(src, dst):
        return "clone"
    if not copy:
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
    shutil.copy2(src, dst)
    return "copy"


def _clone(src: Path, dst: Path) -> bool:
    """A copy-on-write clone (APFS clonefile, Linux FICLONE) with the source's times; False where the
    file system has none."""
    if sys.platform == "darwin":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.clonefile(os.fsencode(src), os.fsencode(dst), 0) == 0
    import fcntl

    with open(src, "rb") as s, open(dst, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        except OSError:
            cloned = False
        else:
            cloned = True
    if not cloned:
        dst.unlink()
        return False
    shutil.copystat(src, dst)
    return True
