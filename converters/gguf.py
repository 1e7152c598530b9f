"""GGUF files of the FLUX.1 transformer (the widely shared `flux1-dev-Q4_K_S.gguf` and the like) -> runtime
names and exact float32 values, one tensor at a time.

Such a file holds only the transformer, in Black Forest Labs' names (no prefix), with the architecture
field `general.architecture = "flux"`. 2-D weights come in F16/BF16, the legacy types (Q8_0, Q5_0, Q5_1,
Q4_0, Q4_1) or the K-types (Q2_K ... Q6_K), 1-D tensors in F32. The `gguf` package (an optional extra:
`pip install '.[gguf]'` in the clone, or `pip install gguf`) parses the file and dequantizes every type; its values are the reference.

The legacy types are affine per block of 32 weights, as MLX's group-32 quantization is: Q4_1 and Q5_1
store w = d·q + m, the others w = d·(q − 8|16|128), so `affine_chunks` gives MLX's packed layout with
scale d and bias m (or −8·d, −16·d, −128·d). Every product there is exact in float32 (d is a float16),
so MLX's dequantization equals gguf's exactly while the scales stay float16 or float32.
"""

import re
from pathlib import Path

import numpy as np

from mflux.converters import bfl
from mflux.errors import MfluxError

MAGIC = b"GGUF"
ARCHITECTURE = "flux"
GROUP_SIZE = 32  # the legacy types' block
FLOAT_TYPES = ("F32", "F16", "BF16")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LEGACY_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}
SUPPORTED = (*FLOAT_TYPES, *LEGACY_BITS, *K_TYPES)
# The signed legacy types store q - offset with no minimum: MLX's bias is then -offset·d.
_OFFSET = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}
# Bytes per block of 32: a float16 d, a float16 m where the type has one, Q5's 32 fifth bits, the values.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
# Weights dequantized at once: keeps the float32 temporaries of a large tensor to a few 4 MB blocks.
_CHUNK_ELEMENTS = 2**20


def is_gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic bytes (the name is never looked at)."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def open_file(path: Path):
    """The file's parsed header (gguf.GGUFReader; tensor data stays on disk, memory-mapped), refused in
    one line when gguf is missing or the file is damaged, truncated, of another architecture, or holds a
    type this reader does not take."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MfluxError(
            f"{path.name} is a GGUF file: reading it needs the gguf package (pip install gguf)"
        ) from None
    try:
        reader = GGUFReader(path)
    except ValueError as e:
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if unknown:  # a tensor's type number that ggml has never defined
            raise MfluxError(
                f"{path}: a tensor has an unknown GGUF quantization type (number {unknown[1]}); "
                f"convert takes {', '.join(SUPPORTED)}"
            ) from None
        raise _damaged(path, e) from None
    except (IndexError, KeyError, OverflowError, TypeError) as e:
        raise _damaged(path, e) from None
    _check_architecture(path, reader)
    _check_tensors(path, reader)
    return reader


def _damaged(path: Path, e: Exception) -> MfluxError:
    # gguf reads the header and maps each tensor's bytes; a cut file fails there, with numpy's words.
    return MfluxError(f"{path}: truncated or damaged GGUF file ({str(e) or repr(e)}) (download it again)")


def _check_architecture(path: Path, reader) -> None:
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != ARCHITECTURE:
        what = f"architecture {arch!r}" if arch else "no architecture field"
        raise MfluxError(
            f"{path.name} is a GGUF of {what}, not a FLUX.1 transformer ({ARCHITECTURE!r}): "
            "convert takes FLUX.1 GGUF files such as flux1-dev-Q4_K_S.gguf"
        )


def _check_tensors(path: Path, reader) -> None:
    # A cut file never gets here: gguf fails to map its last tensor's bytes (see `_damaged`).
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED:
            raise MfluxError(
                f"{path}: tensor {t.name} is stored as {kind}, which convert does not take "
                f"(it takes {', '.join(SUPPORTED)})"
            )


def tensors(reader) -> dict:
    """{runtime name: gguf ReaderTensor}: BFL names with any ComfyUI prefix stripped."""
    return bfl.sanitize({t.name: t for t in reader.tensors})


def shape(reader, t) -> tuple[int, ...]:
    """A tensor's shape as torch gave it: GGUF lists dimensions innermost first. A writer that reshaped
    a tensor records the original under `comfy.gguf.orig_shape.<name>`, as ComfyUI-GGUF reads it."""
    original = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
    if original is not None:
        return tuple(int(n) for n in original.contents())
    return tuple(int(n) for n in reversed(t.shape.tolist()))


def shapes(reader) -> dict[str, tuple[int, ...]]:
    return {name: shape(reader, t) for name, t in tensors(reader).items()}


def types(reader) -> dict[str, str]:
    """{runtime name: the GGUF type it is stored in}, e.g. 'Q4_K', 'F32'."""
    return {name: t.tensor_type.name for name, t in tensors(reader).items()}


def dequantized_chunks(t):
    """The tensor's exact float32 values (`gguf.quants.dequantize`) as 2-D blocks of whole rows (a row
    being GGUF's innermost dimension, torch's last), so a large tensor never has more than one block's
    float32 temporaries. Concatenated and reshaped to `shape`, they are the tensor."""
    from gguf.quants import dequantize

    rows = t.data.reshape(-1, t.data.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // int(t.shape[0]))
    for start in range(0, rows.shape[0], step):
        yield dequantize(np.asarray(rows[start : start + step]), t.tensor_type)


def affine_chunks(t):
    """A legacy-type 2-D weight in MLX's group-32 affine layout, as blocks of whole rows: (packed uint32
    of (rows, in·bits/32), float32 scales and biases of (rows, in/32)). Exact: MLX's dequantization of
    them gives gguf's values."""
    rows = t.data.reshape(-1, t.data.shape[-1])  # GGUF rows; a reshaped tensor's blocks run on as its own
    step = max(1, _CHUNK_ELEMENTS // int(t.shape[0]))  # unpacking takes `bits` bytes a weight
    for start in range(0, rows.shape[0], step):
        yield _affine_rows(t.tensor_type.name, rows[start : start + step])


def _affine_rows(kind: str, data: np.ndarray):
    blocks = np.asarray(data).reshape(data.shape[0], -1, _BLOCK_BYTES[kind])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind in _OFFSET:
        q = _values(kind, blocks[..., 2:])
        bias = -_OFFSET[kind] * d  # exact: d has 11 significant bits, the offset at most 8
    else:
        q = _values(kind, blocks[..., 4:])
        bias = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return _pack(q.reshape(data.shape[0], -1), LEGACY_BITS[kind]), d, bias


def _values(kind: str, body: np.ndarray) -> np.ndarray:
    """The unsigned integers q of each 32-weight block, in weight order (blocks, 32)."""
    if kind == "Q8_0":
        return (body.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    if kind in ("Q4_0", "Q4_1"):
        return _nibbles(body)
    high, low = body[..., :4].copy().view(np.uint32), body[..., 4:]  # Q5: 32 fifth bits, then nibbles
    fifth = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return _nibbles(low) | (fifth << 4)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    # ggml keeps weight j in the low nibble of byte j and weight j+16 in its high nibble.
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: each row one little-endian bit stream of `bits`-wide values, read as uint32."""
    stream = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(stream.reshape(q.shape[0], -1), axis=-1, bitorder="little").view(np.uint32)
