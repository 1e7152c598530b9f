"""Writes that never leave a half-written file under the real name: a temporary file beside it, then
a rename. A full disk, or any other failed write, is one clear error."""

import errno
import os
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from mflux.errors import MfluxError


@contextmanager
def write_errors(path: Path, tmp: Path | None = None):
    """Turn a failed write of `path` into one MfluxError, removing the temporary file `tmp`."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # MLX's writer raises RuntimeError
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space" in str(e):
            raise MfluxError(
                f"cannot write {path}: the disk is full (free some space, then --resume)"
            ) from None
        raise MfluxError(f"cannot write {path}: {e}") from None


def atomic_save(path: Path, arrays: dict, metadata: dict) -> None:
    """safetensors, through a temporary file beside `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    with write_errors(path, tmp):
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        os.replace(tmp, path)


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with write_errors(path, tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def atomic_png(path: Path, image) -> None:
    """A PIL image as PNG, through a temporary file beside `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with write_errors(path, tmp):
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
