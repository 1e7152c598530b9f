"""Writes that never leave a half-written file under the real name: a temporary file beside it, then
a rename. A full disk is one clear error."""

import errno
import os
from pathlib import Path

import mlx.core as mx

from mflux.errors import MfluxError


def atomic_save(path: Path, arrays: dict, metadata: dict) -> None:
    """Write safetensors to a temporary file beside `path`, then rename: a crash or a full disk never
    leaves a half-written file under the real name."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space" in str(e):
            raise MfluxError(
                f"cannot write {path}: the disk is full (free some space, then --resume)"
            ) from None
        raise MfluxError(f"cannot write {path}: {e}") from None


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
