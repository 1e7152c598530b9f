"""The GGUF side of `mflux convert FILE.gguf`: the transformer's tensors, dequantized one at a time.

Floats are the exact float32 dequantization (`mflux.converters.gguf`), rounded once to the chosen dtype;
under a QuantSpec (`--bits`) they are then quantized as every other source is. With `keep` (the
`--keep-gguf-quantization` flag) the legacy types' weights keep their blocks, repacked into MLX's
group-32 affine layout with float32 scales and biases: exact, where bfloat16 scales would round each
block's float16 scale to 8 significant bits. K-types have two levels of scales, which MLX's layout
cannot hold: they are always dequantized.
"""

from collections import Counter
from functools import lru_cache
from pathlib import Path

import mlx.core as mx

from mflux.converters import gguf
from mflux.runtime.loader import cast_and_quantize
from mflux.runtime.quantization import QuantSpec, should_quantize

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


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


def record(path: Path, keep: bool) -> dict:
    """What the manifest's `source` table adds: the format, whether its blocks were kept, and each
    tensor's GGUF type."""
    return {"format": "gguf", "keep_gguf_quantization": keep, "tensor_types": gguf.types(_reader(path))}


def kept(path: Path) -> dict[str, int]:
    """{layer path: bits} of the weights `keep` stores in their own blocks."""
    reader = _reader(path)
    return {
        name.removesuffix(".weight"): gguf.LEGACY_BITS[t.tensor_type.name]
        for name, t in gguf.tensors(reader).items()
        if t.tensor_type.name in gguf.LEGACY_BITS and _is_linear_weight(name, gguf.shape(reader, t))
    }


def quantization(path: Path) -> dict | None:
    """The manifest's quantization table for the transformer `keep` writes: group 32 affine, the most
    common bits as the default and the other layers as overrides; None when no weight is kept."""
    bits = kept(path)
    if not bits:
        return None
    main = Counter(bits.values()).most_common(1)[0][0]
    table = QuantSpec(bits=main, group_size=gguf.GROUP_SIZE).to_dict()
    layers = {layer: {"bits": b} for layer, b in bits.items() if b != main}
    return {**table, "layers": layers} if layers else table


def weights(path: Path, dtype: str, spec: QuantSpec | None, keep: bool):
    """(runtime name, evaluated mx.array) for each tensor, one at a time."""
    reader = _reader(path)
    keep_bits = kept(path) if keep else {}
    for name, t in gguf.tensors(reader).items():
        if name.removesuffix(".weight") in keep_bits:
            packed, scales, biases = gguf.affine(reader, t)
            layer = name.removesuffix(".weight")
            yield name, mx.array(packed)
            yield f"{layer}.scales", mx.array(scales)
            yield f"{layer}.biases", mx.array(biases)
            continue
        value = _dequantized(reader, t, getattr(mx, dtype))
        for out_name, arr in cast_and_quantize(
            "transformer", {name: value}, getattr(mx, dtype), spec
        ).items():
            mx.eval(arr)
            yield out_name, arr


def _dequantized(reader, t, dtype) -> mx.array:
    # Each block of rows is rounded to `dtype` (once, from exact float32) before the next is made.
    parts = []
    for values in gguf.dequantized_chunks(t):
        part = mx.array(values).astype(dtype)
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts).reshape(gguf.shape(reader, t))


def estimate(path: Path, dtype: str, spec: QuantSpec | None, keep: bool) -> int:
    """The bytes the transformer will take: the file's sizes say nothing here, its weights' counts do."""
    reader = _reader(path)
    keep_bits = kept(path) if keep else {}
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
