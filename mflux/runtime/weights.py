"""Safetensors without loading whole files: a header reader, one-tensor reads, and a sharded writer.

The format is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then the raw bytes. Reading one tensor at a time keeps memory near the
size of that tensor, which is what lets a 16 GB machine convert the 34 GB pipeline.
"""

import errno
import json
import math
import os
import stat
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
# float8 tensors, read as their bytes: only `mflux convert` and `inspect` open files holding them (fp8=True), since
# MLX has no float8 dtype to load them as (mflux.converters.formats dequantizes them).
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
DTYPE_NAMES = {k: v[1] for k, v in _DTYPES.items()}  # safetensors dtype -> mlx dtype name
MAX_HEADER_BYTES = 100 * 2**20  # the real checkpoints' headers are under 1 MiB


def refuse_pickle(path: Path) -> None:
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise MfluxError(
            f"{path}: pickle-based weights are refused, since loading them can run arbitrary code "
            "(convert the file to .safetensors first)"
        )


class SafetensorsFile:
    """One .safetensors file, opened lazily. `tensors` maps name -> (dtype, shape, (begin, end)).

    Opening reads and checks the header only, so a damaged or hostile file is refused with one line
    before anything (mx.load included) reads its data.
    """

    def __init__(self, path: str | os.PathLike, fp8: bool = False):
        self.path = Path(path)
        refuse_pickle(self.path)
        header, self._data_start, size = _read_header(self.path)
        self.metadata = _metadata(self.path, header.pop("__metadata__", None))
        self.tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
        for name, info in header.items():
            self.tensors[name] = _entry(self.path, name, info, fp8)
        _check_extents(self.path, self.tensors, size - self._data_start)
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
        return out.view(_DTYPES[dtype][0] if dtype in _DTYPES else np.uint8).reshape(shape)

    def load(self, name: str):
        """One tensor as an mlx array, in the file's own dtype."""
        import mlx.core as mx

        arr = mx.array(self.numpy(name))
        if self.tensors[name][0] in FP8_DTYPES:
            return arr  # the float8 bytes as uint8
        target = getattr(mx, _DTYPES[self.tensors[name][0]][1])
        # bfloat16 arrives as its uint16 bits; float64 arrives already converted to float32 by mx.array
        return arr.view(target) if arr.dtype != target and arr.dtype.size == target.size else arr

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_header(path: Path) -> tuple[dict, int, int]:
    """The parsed JSON header, where the data starts, and the file's size."""
    try:
        st = os.stat(path)  # stat, not open: opening a FIFO would block
        if not stat.S_ISREG(st.st_mode):
            raise MfluxError(f"{path}: not a regular file (give a .safetensors file)")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(st.st_size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} does not fit in the file ({st.st_size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise MfluxError(f"{path}: no such file") from None
    except RecursionError:
        raise MfluxError(f"{path}: not a valid safetensors file (header nested too deeply)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise MfluxError(f"{path}: not a valid safetensors file ({e})") from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise MfluxError(f"{str(path)[:80]}...: file name too long (use a shorter path)") from None
        raise MfluxError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise MfluxError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    return header, 8 + n, st.st_size


def _metadata(path: Path, meta) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MfluxError(f"{path}: malformed header (__metadata__ must map names to strings)")
    return meta


def _entry(path: Path, name: str, info, fp8: bool = False) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """One header entry, checked: a known dtype, a shape and offsets of non-negative integers that agree."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError):
        raise MfluxError(f"{path}: malformed header entry for {name!r}") from None
    if not isinstance(dtype, str):
        raise MfluxError(f"{path}: malformed header entry for {name!r} (dtype must be a string)")
    if dtype in FP8_DTYPES and not fp8:
        raise MfluxError(
            f"{path}: tensor {name!r} is float8 ({dtype}), which MLX cannot load: convert the file first "
            f"(mflux convert {path.name})"
        )
    if dtype not in _DTYPES and dtype not in FP8_DTYPES:
        raise MfluxError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise MfluxError(f"{path}: malformed header entry for {name!r} (shape must be non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise MfluxError(
            f"{path}: malformed header entry for {name!r} (data_offsets must be two non-negative integers)"
        )
    begin, end = offsets
    # Python integers: a shape whose product overflows 64 bits can never match two in-file offsets
    if end < begin or end - begin != math.prod(shape) * BYTES_PER_ELEMENT.get(dtype, 1):
        raise MfluxError(f"{path}: tensor {name!r} has a size that does not match its shape")
    return dtype, tuple(shape), (begin, end)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_extents(path: Path, tensors: dict, data_bytes: int) -> None:
    """Refuse tensors that overlap or that reach past the end of the file."""
    last_end, last_name = 0, None
    for name, (_, _, (begin, end)) in sorted(tensors.items(), key=lambda t: t[1][2]):
        if end > data_bytes:
            raise MfluxError(
                f"{path}: file is truncated ({data_bytes} data bytes, tensor {name!r} needs "
                f"{end}); download or copy it again"
            )
        if begin < last_end:
            raise MfluxError(f"{path}: malformed header (tensors {last_name!r} and {name!r} overlap)")
        last_end, last_name = max(last_end, end), name


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
