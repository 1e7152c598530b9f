"""The GGUF side of `mflux convert FILE.gguf`: the transformer's shards, written a block of rows at a time.

Floats are the exact float32 dequantization (`mflux.converters.gguf`), rounded once to the chosen dtype;
under a QuantSpec (`--bits`) they are then quantized as every other source is. With `keep` (the
`--keep-gguf-quantization` flag) the legacy types' weights keep their blocks, repacked into MLX's
group-32 affine layout with float32 scales and biases: exact, where bfloat16 scales would round each
block's float16 scale to 8 significant bits. K-types have two levels of scales, which MLX's layout
cannot hold: they are always dequantized.
"""

import json
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from mflux.converters import gguf
from mflux.runtime.quantization import QuantSpec, should_quantize

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # safetensors' dtype names


def _reader(path: Path):
    # The header is parsed once per conversion (a file replaced in between is read again); the tensor
    # data stays memory-mapped on disk.
    st = Path(path).stat()
    return _parsed(Path(path).resolve(), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=2)
def _parsed(path: Path, size: int, mtime_ns: int):
    return gguf.open_file(path)


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{runtime name: shape}, from the header alone."""
    return gguf.shapes(_reader(path))


def types(path: Path) -> dict[str, str]:
    """{runtime name: the GGUF type it is stored in}, from the header alone."""
    return gguf.types(_reader(path))


def kept_layers(reader) -> dict[str, int]:
    """{layer path: bits} of the weights `keep` stores in their own blocks."""
    return {
        name.removesuffix(".weight"): gguf.LEGACY_BITS[t.tensor_type.name]
        for name, t in gguf.tensors(reader).items()
        if t.tensor_type.name in gguf.LEGACY_BITS and _is_linear_weight(name, gguf.shape(reader, t))
    }


def quantization(path: Path) -> dict | None:
    """The manifest's quantization table for the transformer `keep` writes: group 32 affine, the most
    common bits as the default and the other layers as overrides; None when no weight is kept."""
    bits = kept_layers(_reader(path))
    if not bits:
        return None
    main = Counter(bits.values()).most_common(1)[0][0]
    table = QuantSpec(bits=main, group_size=gguf.GROUP_SIZE).to_dict()
    layers = {layer: {"bits": b} for layer, b in bits.items() if b != main}
    return {**table, "layers": layers} if layers else table


@dataclass
class _Tensor:
    """One output tensor as the safetensors header lists it."""

    name: str
    dtype: str  # safetensors' name: F32, F16, BF16, U32
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (2 if self.dtype in ("F16", "BF16") else 4)


@dataclass
class _Item:
    """The output tensors one GGUF tensor becomes, and `write(file)`, which writes their bytes in order."""

    tensors: list[_Tensor]
    write: Callable
    weights: int  # the float weights they stand for

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Written:
    quantized: int  # layers stored quantized
    bits_per_weight: float


def save(path: Path, folder: Path, dtype: str, spec: QuantSpec | None, keep: bool, bar, max_shard_bytes: int):
    """Write the transformer's shards and index into `folder`, as `weights.save_shards` lays them out. The
    header gives every output's name, dtype and shape before any value is made, so each shard's header is
    written first and each tensor is streamed into it a block of rows at a time: memory stays near one
    block, never a whole tensor or shard. `bar.update(n)` counts the bytes written."""
    items = _plan(_reader(path), dtype, spec, keep)
    shards = _shards(items, max_shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(folder / name, shard, bar)
        weight_map.update({t.name: name for item in shard for t in item.tensors})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return _written(items)


def _plan(reader, dtype: str, spec: QuantSpec | None, keep: bool) -> list[_Item]:
    keep_bits = kept_layers(reader) if keep else {}
    items = []
    for name, t in gguf.tensors(reader).items():
        shape = gguf.shape(reader, t)
        layer = name.removesuffix(".weight")
        if layer in keep_bits:
            items.append(_kept(reader, t, layer, shape, keep_bits[layer]))
        elif should_quantize("transformer", name, shape, spec):
            items.append(_quantized(t, layer, shape, dtype, spec))
        else:
            tensor = _Tensor(name, _ST[dtype], shape)
            items.append(_Item([tensor], partial(_write_float, t, dtype), int(np.prod(shape))))
    return items


def _kept(reader, t, layer: str, shape: tuple, bits: int) -> _Item:
    out, width = shape
    groups = (out, width // gguf.GROUP_SIZE)
    tensors = [_Tensor(f"{layer}.weight", "U32", (out, width * bits // 32))]
    tensors += [_Tensor(f"{layer}.scales", "F32", groups), _Tensor(f"{layer}.biases", "F32", groups)]

    def write(f):
        scales, biases = [], []  # 1/16 of the weights' bytes or less: written after them
        for packed, s, b in gguf.affine_chunks(t):
            f.write(packed.tobytes())
            scales.append(s.tobytes())
            biases.append(b.tobytes())
        f.write(b"".join(scales) + b"".join(biases))

    return _Item(tensors, write, out * width)


def _quantized(t, layer: str, shape: tuple, dtype: str, spec: QuantSpec) -> _Item:
    out, width = shape
    groups = (out, width // spec.group_size)
    tensors = [_Tensor(f"{layer}.weight", "U32", (out, width * spec.bits // 32))]
    tensors += [
        _Tensor(f"{layer}.scales", _ST[dtype], groups),
        _Tensor(f"{layer}.biases", _ST[dtype], groups),
    ]

    def write(f):
        # MLX's groups run along a row, so quantizing a block of rows is quantizing the tensor's rows.
        scales, biases = [], []
        for values in gguf.dequantized_chunks(t):
            packed, s, b = mx.quantize(
                mx.array(values).astype(getattr(mx, dtype)), spec.group_size, spec.bits
            )
            f.write(_bytes(packed))
            scales.append(_bytes(s))
            biases.append(_bytes(b))
        f.write(b"".join(scales) + b"".join(biases))

    return _Item(tensors, write, out * width)


def _write_float(t, dtype: str, f) -> None:
    for values in gguf.dequantized_chunks(t):  # each block rounded once, from exact float32
        f.write(_bytes(mx.array(values).astype(getattr(mx, dtype))))


def _bytes(arr: mx.array) -> bytes:
    # numpy has no bfloat16: 2-byte floats travel as their bits
    return np.array(arr.view(mx.uint16) if arr.itemsize == 2 else arr).tobytes()


def _shards(items: list[_Item], max_shard_bytes: int) -> list[list[_Item]]:
    shards, size = [[]], 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _write_shard(path: Path, items: list[_Item], bar) -> None:
    header, offset = {}, 0
    for t in (t for item in items for t in item.tensors):
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header with spaces to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for item in items:
            start = f.tell()
            item.write(f)
            if f.tell() - start != item.nbytes:  # the plan and the values disagree: a bug, not the user's
                raise RuntimeError(
                    f"{item.tensors[0].name}: wrote {f.tell() - start} bytes, planned {item.nbytes}"
                )
            bar.update(item.nbytes)


def _written(items: list[_Item]) -> Written:
    quantized = sum(item.tensors[0].dtype == "U32" for item in items)
    bits = sum(item.nbytes * 8 for item in items)
    return Written(quantized, bits / max(sum(item.weights for item in items), 1))


def estimate(path: Path, dtype: str, spec: QuantSpec | None, keep: bool) -> int:
    """The bytes the transformer will take: the file's sizes say nothing here, its weights' counts do."""
    reader = _reader(path)
    keep_bits = kept_layers(reader) if keep else {}
    total = 0
    for name, t in gguf.tensors(reader).items():
        n = int(t.n_elements)
        bits = keep_bits.get(name.removesuffix(".weight"))
        if bits is not None:
            total += n * bits // 8 + n // gguf.GROUP_SIZE * 8  # float32 scale and bias per block
        elif should_quantize("transformer", name, gguf.shape(reader, t), spec):
            total += int(n * (spec.bits / 8 + 2 * _ITEMSIZE[dtype] / spec.group_size))
        else:
            total += n * _ITEMSIZE[dtype]
    return total


def _is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    # Every 2-D weight of the FLUX.1 transformer belongs to a Linear, which MLX can quantize.
    return name.endswith(".weight") and len(shape) == 2 and shape[-1] % gguf.GROUP_SIZE == 0
