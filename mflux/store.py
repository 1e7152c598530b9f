"""The model store: one folder per model under $MFLUX_HOME (default ~/.mflux), each with manifest.toml.

A model is built in `<root>/.tmp/` and renamed into place, so it is either complete or absent. A temp
entry is named `<name>.<pid>.<token>[.old|.rm]`; a build also holds an flock on `<name>.<pid>.<token>.lock`.
`cleanup()` removes an entry only when its pid is gone and its lock is free, so it never touches the
work of a live process, even one in another pid namespace sharing the store.

Every folder at the root whose name does not start with a dot is a model. One without a valid manifest
is not listed; `broken()` names it so `mflux list` can say so, and `mflux rm` can remove it.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mflux.errors import InvalidArgument, MfluxError
from mflux.manifest import MANIFEST, Manifest, read_manifest, remake_command
from mflux.runtime.quantization import AFFINE_BITS

TMP = ".tmp"
LAST = ".last"
MAX_NAME = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT_NAME = re.compile(r"^(?P<base>.+)-q(?P<bits>\d)$")  # <base>-q<bits>: quantize at load time
_TMP_ENTRY = re.compile(r"(?P<stem>.+\.(?P<pid>\d+)\.[0-9a-f]{8})(?P<suffix>\.lock|\.old|\.rm)?")
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def store_root() -> Path:
    """$MFLUX_HOME, or ~/.mflux; read at each call so tests and users can move the store."""
    return Path(os.environ.get("MFLUX_HOME") or "~/.mflux").expanduser().absolute()


def validate_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-', start with a letter or "
            f"digit, no '..', at most {MAX_NAME} characters (for example schnell-q8)"
        )
    return name


def close_names(name: str, names: Iterable[str], n: int) -> list[str]:
    """Up to `n` of `names` like `name`, ignoring case (`TINY` finds `tiny`), the closest first."""
    by_lower: dict[str, list[str]] = {}
    for known in sorted(names):
        by_lower.setdefault(known.lower(), []).append(known)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
    return [known for c in close for known in by_lower[c]][:n]


def format_size(n: int) -> str:
    """Decimal units, as download sizes are quoted: 33.7 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{n} B"


@dataclass
class StoredModel:
    name: str
    path: Path
    manifest: Manifest
    size_bytes: int  # of the manifest's files as they are on disk now
    modified: datetime  # when it was committed (the manifest's mtime), UTC
    damaged: list[str] = field(default_factory=list)  # "<path>: missing" or a size that differs

    def damage_hint(self) -> str:
        """One line naming what is wrong and the fix, for a damaged model."""
        shown = "; ".join(self.damaged[:3]) + ("; ..." if len(self.damaged) > 3 else "")
        return (
            f"{self.name} is damaged ({shown}) (check it with: mflux inspect {self.name} --verify; then "
            f"make it again: {remake_command(self.manifest)})"
        )


@dataclass(frozen=True)
class Resolved:
    """A model name resolved in the store: the stored model, and the bits to quantize it to at load time
    (`<base>-q<bits>` of a stored `<base>`; None for a name stored as it is)."""

    name: str
    path: Path
    bits: int | None = None


class NotStored(MfluxError):
    """A model the store does not hold; `pull` is the catalog model that provides it (None: a name mflux
    does not know), `bits` the load-time bits its name asks for."""

    def __init__(self, message: str, pull: str | None = None, bits: int | None = None):
        super().__init__(message)
        self.pull, self.bits = pull, bits


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root).expanduser().absolute() if root is not None else store_root()

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / MANIFEST).is_file()

    def check_root(self) -> None:
        """The store is a folder, or not created yet; anything else (a file) is one clear error."""
        if self.root.exists() and not self.root.is_dir():
            what = "MFLUX_HOME" if os.environ.get("MFLUX_HOME") else "the model store"
            raise MfluxError(
                f"{what} {self.root} is not a folder (point MFLUX_HOME at a folder, or move that file away)"
            )

    def make_folder(self, folder: Path) -> None:
        """Create a folder inside the store, as one clear error when the store is not writable."""
        self.check_root()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test.{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise self._os_error(e, f"cannot write in {folder}") from None

    def resolve(self, name: str) -> Resolved:
        """A stored model by name, or `<base>-q<bits>`: a stored `<base>` quantized at load time. Raises
        InvalidArgument for bits mflux cannot make (before any suggestion), else NotStored: pull it,
        or an unknown name with close ones. A LoRA's name (stored or in the catalog) is no model: refused."""
        self._refuse_lora(name)
        if self.exists(name):
            return Resolved(name, self.path(name))
        m = _QUANT_NAME.match(name)
        base, bits = (m["base"], int(m["bits"])) if m else (name, None)
        if bits is not None and bits not in AFFINE_BITS:
            raise InvalidArgument(
                f"{name}: {bits}-bit is not a quantization mflux makes "
                f"(-q{' / -q'.join(map(str, AFFINE_BITS))}, or mflux quantize --mode for the fp modes)"
            )
        if bits is not None and self.exists(base):
            self._refuse_lora(base)
            return Resolved(base, self.path(base), bits)
        raise self._unknown(name, base, bits)

    def lora_file(self, name: str) -> Path | None:
        """The file of the LoRA stored as `name` (`mflux pull canny-lora`), or None where `name` names no
        LoRA mflux knows; a catalog LoRA not pulled yet raises NotStored."""
        from mflux.catalog import catalog

        try:
            validate_name(name)
        except InvalidArgument:
            return None
        if self.exists(name):
            manifest = read_manifest(self.path(name))
            return self.path(name) / manifest.files[0]["path"] if manifest.kind == "lora" else None
        entry = catalog().get(name)
        if entry is not None and entry.kind == "lora":
            raise NotStored(f"LoRA {name!r} is not in the store (get it with: mflux pull {name})", name)
        return None

    def _refuse_lora(self, name: str) -> None:
        from mflux.catalog import catalog

        entry = catalog().get(name)
        try:
            stored = self.exists(name) and read_manifest(self.path(name)).kind == "lora"
        except MfluxError:
            stored = False  # a broken manifest: opening the model says what is wrong with it
        if stored or (entry is not None and entry.kind == "lora" and not self.exists(name)):
            raise InvalidArgument(
                f"{name} is a LoRA, not a model: load it on dev (mflux run -m dev --lora-paths {name})"
            )

    def get(self, name: str) -> StoredModel:
        if not self.exists(name):
            raise self._unknown(name)
        return self._stored(self.path(name))

    def list(self) -> list[StoredModel]:
        """The complete models (a valid manifest), by name."""
        return self.scan()[0]

    def broken(self) -> dict[str, str]:
        """Folders in the store that are not usable models: name -> the reason."""
        return self.scan()[1]

    def remove(self, names: str | Iterable[str]) -> int:
        """Remove models (all names are checked first); returns the bytes freed on disk."""
        names = list(dict.fromkeys([names] if isinstance(names, str) else names))
        self.check_root()
        self.cleanup()
        for name in names:
            if not self.path(name).is_dir():
                raise self._unknown(name)
        freed = 0
        for name in names:
            folder = self.path(name)
            size = _freeable_bytes(folder)
            # Rename first so the model vanishes at once; the slow delete happens out of sight.
            trash = self._tmp_stem(name, ".rm")
            try:
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.rename(folder, trash)
            except OSError as e:
                raise self._os_error(e, f"cannot remove {name!r}") from None
            _rmtree(trash)
            freed += size
        if self._read_last() in names:
            (self.root / LAST).unlink(missing_ok=True)
        return freed

    @contextmanager
    def build(self, name: str, *, force: bool = False, size_hint: int | None = None) -> Iterator[Path]:
        """A fresh folder to build model `name` in. On a normal exit, after the caller has written its
        files and manifest.toml, it is renamed into place atomically; on any exception (Ctrl-C
        included) it is deleted and the store is left as it was. `size_hint` (bytes) improves the
        disk-full message."""
        validate_name(name)
        self.check_root()
        self._refuse_existing(name, force)
        self.cleanup()
        stem, lock_fd = self._start(name)
        try:
            yield stem
            self._commit(stem, name, force)
        except BaseException as e:
            _rmtree(stem)
            if isinstance(e, OSError) and e.errno in _FULL:
                raise self._disk_full(name, size_hint) from None
            raise
        finally:
            Path(f"{stem}.lock").unlink(missing_ok=True)
            os.close(lock_fd)
        self.mark_used(name)

    def cleanup(self) -> int:
        """Remove temp entries of dead processes; returns how many were removed."""
        tmp = self.root / TMP
        if not tmp.is_dir():
            return 0
        groups: dict[str, list[Path]] = {}
        for entry in tmp.iterdir():
            m = _TMP_ENTRY.fullmatch(entry.name)
            if m:
                groups.setdefault(m["stem"], []).append(entry)
        removed = 0
        for stem, entries in groups.items():
            pid = int(_TMP_ENTRY.fullmatch(stem)["pid"])
            if _alive(pid) or _locked(tmp / f"{stem}.lock"):
                continue
            for entry in sorted(entries, key=lambda p: p.suffix == ".lock"):  # the lock goes last
                _rmtree(entry)
                removed += 1
        return removed

    def mark_used(self, name: str) -> None:
        """Record `name` as the model most recently pulled, converted or quantized."""
        validate_name(name)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f"{LAST}.{os.getpid()}.tmp"
            tmp.write_text(name + "\n", encoding="utf-8")
            os.replace(tmp, self.root / LAST)
        except OSError as e:
            raise self._os_error(e, "cannot record the last model used") from None

    def last_used(self) -> str | None:
        name = self._read_last()
        return name if name and self.exists(name) else None

    def free_bytes(self) -> int:
        """Free space on the disk that holds (or will hold) the store."""
        p = self.root
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free

    def _read_last(self) -> str | None:
        try:
            name = (self.root / LAST).read_text(encoding="utf-8").strip()
            return validate_name(name)
        except (OSError, InvalidArgument):
            return None

    def scan(self) -> tuple[list[StoredModel], dict[str, str]]:
        """(the complete models, the broken folders: name -> reason), in one pass over the store."""
        models, broken = [], {}
        self.check_root()
        if not self.root.is_dir():
            return models, broken
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            if not (folder / MANIFEST).is_file():
                broken[folder.name] = f"{folder} has no {MANIFEST}"
                continue
            try:
                models.append(self._stored(folder))
            except MfluxError as e:
                broken[folder.name] = str(e)
        return models, broken

    def _stored(self, folder: Path) -> StoredModel:
        manifest = read_manifest(folder)
        mtime = (folder / MANIFEST).stat().st_mtime
        modified = datetime.fromtimestamp(mtime, tz=timezone.utc)
        size, damaged = files_on_disk(folder, manifest.files)
        return StoredModel(folder.name, folder, manifest, size, modified, damaged)

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def _unknown(self, name: str, base: str | None = None, bits: int | None = None) -> NotStored:
        # `base`: the catalog model that would provide `name` (`schnell` for `schnell-q4` in resolve)
        from mflux.catalog import catalog

        self.check_root()  # "not in the store" would hide that there is no store

        known, base = catalog(), base or name
        if base in known:
            return NotStored(
                f"model {name!r} is not in the store (get it with: mflux pull {base})", base, bits
            )
        if self.path(name).is_dir():
            return NotStored(
                f"{self.path(name)} is not a complete model: it has no {MANIFEST} (remove it: mflux rm {name})"
            )
        close = close_names(name, set(self._names()) | set(known), 3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return NotStored(f"unknown model {name!r} ({hint}see: mflux list, or mflux list --available)")

    def _refuse_existing(self, name: str, force: bool) -> None:
        if self.path(name).exists() and not force:
            raise MfluxError(
                f"model {name!r} already exists in {self.root} (choose another --name, or pass --force to "
                "replace it)"
            )

    def _tmp_stem(self, name: str, suffix: str = "") -> Path:
        return self.root / TMP / f"{name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"

    def _start(self, name: str) -> tuple[Path, int]:
        stem = self._tmp_stem(name)
        fd = None
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            # Lock before the folder exists, so no other process ever sees it unowned.
            fd = os.open(f"{stem}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            stem.mkdir()
        except OSError as e:
            if fd is not None:
                Path(f"{stem}.lock").unlink(missing_ok=True)
                os.close(fd)
            if e.errno in _FULL:
                raise self._disk_full(name, None) from None
            raise self._os_error(e, f"cannot build {name!r}") from None
        return stem, fd

    def _commit(self, stem: Path, name: str, force: bool) -> None:
        if not (stem / MANIFEST).is_file():
            raise RuntimeError(f"model {name!r} was built without {MANIFEST}; nothing was stored")
        manifest = read_manifest(stem)
        if manifest.name != name:
            raise RuntimeError(f"model {name!r} was built with a manifest named {manifest.name!r}")
        final = self.path(name)
        try:
            if not final.exists():
                # Fails on a non-empty folder, so a racing build of the same name cannot be overwritten.
                os.rename(stem, final)
                return
            self._refuse_existing(name, force)
            old = stem.with_name(stem.name + ".old")
            os.rename(final, old)
            try:
                os.rename(stem, final)
            except OSError:
                os.rename(old, final)  # put the old model back
                raise
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise MfluxError(
                    f"model {name!r} was created by another command meanwhile; nothing was stored"
                ) from None
            raise self._os_error(e, f"cannot store {name!r}") from None
        _rmtree(old)

    def _os_error(self, e: OSError, what: str) -> MfluxError:
        if e.errno in _READ_ONLY:
            return MfluxError(
                f"the model store {self.root} is not writable ({e.strerror}) (fix its permissions, or point "
                "MFLUX_HOME at a writable folder)"
            )
        if e.errno in _FULL:
            return self._disk_full(None, None)
        return MfluxError(f"{what}: {e.strerror or e} ({e.filename or self.root})")

    def _disk_full(self, name: str | None, needed: int | None) -> MfluxError:
        what = f" while writing model {name!r}" if name else ""
        need = f"needs about {format_size(needed)}, " if needed else ""
        return MfluxError(
            f"disk full{what} in {self.root} ({need}{format_size(self.free_bytes())} free) (free some "
            "space, or move the store with MFLUX_HOME=/path/on/a/bigger/disk)"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _locked(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _rmtree(path: Path) -> None:
    # Best effort: what can't be deleted now (a read-only disk) is left for a later cleanup.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def files_on_disk(folder: Path, files: list[dict]) -> tuple[int, list[str]]:
    """The bytes of the manifest's files present now, and each missing or wrong-size one: a stat per
    file, so `mflux list` stays fast (`mflux inspect NAME --verify` checks the contents)."""
    size, damaged = 0, []
    for f in files:
        st, problem = file_on_disk(folder, f)
        size += st.st_size if st else 0
        damaged += [problem] if problem else []
    return size, damaged


def file_on_disk(folder: Path, f: dict) -> tuple[os.stat_result | None, str | None]:
    """One manifest file's stat (None when missing) and what is wrong with it, if anything: missing, not
    a regular file, or not the manifest's size (`<path> is missing`)."""
    try:
        st = os.stat(folder / f["path"])
    except OSError:
        return None, f"{f['path']} is missing"
    if not stat.S_ISREG(st.st_mode):
        return st, f"{f['path']} is not a regular file"
    if st.st_size != f["size"]:
        return st, f"{f['path']} is {st.st_size} bytes, its manifest says {f['size']}"
    return st, None


def _freeable_bytes(folder: Path) -> int:
    # Files only count when deleting them frees space: not symlinks, not hard links shared elsewhere.
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                total += st.st_size
    return total
