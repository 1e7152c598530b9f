"""Safetensors without loading whole files: a header reader, one-tensor reads, and a sharded writer.

The format is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then the raw bytes. Reading one tensor at a time keeps memory near the
size of that tensor, which is what lets a 16 GB machine convert the 34 GB pipeline.
"""

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mflux.errors import MfluxError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")

# safetensors dtype -> (numpy dtype used to read the bytes, mlx dtype name to view them as)
_DTYPES = {
    "F64": (np.float64, "float64"),
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "I64": (np.int64, "int64"),
    "I32": (np.int32, "int32"),
    "I16": (np.int16, "int16"),
    "I8": (np.int8, "int8"),
    "U64": (np.uint64, "uint64"),
    "U32": (np.uint32, "uint32"),
    "U16": (np.uint16, "uint16"),
    "U8": (np.uint8, "uint8"),
    "BOOL": (np.bool_, "bool_"),
}
BYTES_PER_ELEMENT = {k: np.dtype(v[0]).itemsize for k, v in _DTYPES.items()}


def refuse_pickle(path: Path) -> None:
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise MfluxError(
            f"{path}: pickle-based weights are refused, since loading them can run arbitrary code "
            "(convert the file to .safetensors first)"
        )


class SafetensorsFile:
    """One .safetensors file, opened lazily. `tensors` maps name -> (dtype, shape, (begin, end))."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        refuse_pickle(self.path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file is shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 * 2**20):
                    raise ValueError(f"header length {n} does not fit in the file")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise MfluxError(f"{self.path}: no such file") from None
        except (ValueError, UnicodeDecodeError, struct.error) as e:
            raise MfluxError(f"{self.path}: not a valid safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise MfluxError(f"{self.path}: malformed header entry for {name!r}") from None
            if dtype not in _DTYPES:
                raise MfluxError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * BYTES_PER_ELEMENT[dtype]:
                raise MfluxError(f"{self.path}: tensor {name!r} has a size that does not match its shape")
            if self._data_start + end > size:
                raise MfluxError(
                    f"{self.path}: file is truncated ({size} bytes, tensor {name!r} needs "
                    f"{self._data_start + end}); download or copy it again"
                )
            self.tensors[name] = (dtype, shape, (begin, end))
        self._fd: int | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def numpy(self, name: str) -> np.ndarray:
        """The tensor's bytes as a numpy array (bfloat16 comes back as uint16), copied out of the file."""
        dtype, shape, (begin, end) = self.tensors[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        # pread, not mmap: mapped pages stay resident and count against the process until unmapped,
        # so reading a whole file through a map grows memory to the file's size.
        out = np.empty(end - begin, dtype=np.uint8)
        done = 0
        while done < out.size:  # one read returns at most about 2 GB on Linux
            n = os.preadv(self._fd, [memoryview(out)[done:]], self._data_start + begin + done)
            if n == 0:
                raise MfluxError(f"{self.path}: file is truncated (it changed while being read)")
            done += n
        return out.view(_DTYPES[dtype][0]).reshape(shape)

    def load(self, name: str):
        """One tensor as an mlx array, in the file's own dtype."""
        import mlx.core as mx

        arr = mx.array(self.numpy(name))
        target = getattr(mx, _DTYPES[self.tensors[name][0]][1])
        # bfloat16 arrives as its uint16 bits; float64 arrives already converted to float32 by mx.array
        return arr.view(target) if arr.dtype != target and arr.dtype.size == target.size else arr

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TensorSource:
    """All the .safetensors files of one component folder (or one file), as one lazy name -> tensor map."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.files = [SafetensorsFile(p) for p in paths]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.tensors:
                self._where[k] = f

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "TensorSource":
        folder = Path(folder)
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            if pickles:
                refuse_pickle(folder / pickles[0])
            raise MfluxError(
                f"{folder}: no .safetensors weights found (the model may be damaged: check it with "
                f"`mflux inspect {folder.parent} --verify`, then pull or convert it again)"
            )
        return cls(paths)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].tensors[name][1]

    def dtype(self, name: str) -> str:
        return self._where[name].tensors[name][0]

    def load(self, name: str):
        return self._where[name].load(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


def save_shards(
    tensors: Iterator[tuple[str, object]],
    folder: str | os.PathLike,
    max_shard_bytes: int = 2 * 2**30,
    metadata: dict[str, str] | None = None,
    prefix: str = "model",
) -> list[Path]:
    """Write (name, mx.array) pairs into shards of bounded size plus an index json, releasing each shard
    once written. Returns the files written."""
    import mlx.core as mx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []  # each written shard's tensor names
    current: dict = {}
    current_bytes = 0
    for name, arr in tensors:
        if current and current_bytes + arr.nbytes > max_shard_bytes:
            shards.append(_write_shard(mx, folder, len(shards) + 1, current, metadata, prefix))
            current, current_bytes = {}, 0
        current[name] = arr
        current_bytes += arr.nbytes
    shards.append(_write_shard(mx, folder, len(shards) + 1, current, metadata, prefix))
    # Names are known only at the end, when the shard count is.
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        final = folder / f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        (folder / f".{prefix}-{i:05d}.safetensors").rename(final)
        files.append(final)
        weight_map.update(dict.fromkeys(names, final.name))
    index = folder / f"{prefix}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": metadata or {}, "weight_map": weight_map}, indent=2) + "\n")
    return [*files, index]


def _write_shard(mx, folder: Path, number: int, tensors: dict, metadata, prefix: str) -> list[str]:
    """Write one shard under a temporary name, release its arrays, and return its tensor names."""
    mx.eval(list(tensors.values()))
    mx.save_safetensors(str(folder / f".{prefix}-{number:05d}.safetensors"), tensors, metadata=metadata or {})
    names = list(tensors)
    tensors.clear()
    return names
