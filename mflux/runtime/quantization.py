"""Which tensors are quantized, and how. One rule, shared by runtime `-q` and `mflux quantize`.

The decision:
- Components: the transformer, T5 (`text_encoder_2`) and CLIP (`text_encoder`). The VAE is never
  quantized: it is small (0.17 GB), convolutional, and the image is most sensitive to it.
- Tensors: the 2-D `.weight` of Linear and token-Embedding layers, whose input (last) width is a
  multiple of the group size. MLX's quantized matmul needs that.
- Kept in float: T5's relative attention bias and CLIP's position embedding (tiny, and
  precision-sensitive), norms, biases, and anything 1-D.
"""

from dataclasses import dataclass

from mflux.errors import InvalidArgument

QUANTIZABLE_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
AFFINE_BITS = (3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# fp modes fix their own bits and group size
FP_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
MODES = ("affine", *FP_MODES)
_KEEP_FLOAT = ("relative_attention_bias", "position_embedding")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int = 64
    mode: str = "affine"

    def __post_init__(self):
        if self.mode == "affine":
            if self.bits not in AFFINE_BITS:
                raise InvalidArgument(
                    f"bits must be one of {', '.join(map(str, AFFINE_BITS))}, got {self.bits}"
                )
            if self.group_size not in GROUP_SIZES:
                raise InvalidArgument(
                    f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}"
                )
        elif self.mode in FP_MODES:
            if (self.bits, self.group_size) != FP_MODES[self.mode]:
                b, g = FP_MODES[self.mode]
                raise InvalidArgument(
                    f"mode {self.mode} fixes bits={b} and group size={g}; "
                    f"drop --bits/--group-size or pass those values"
                )
        else:
            raise InvalidArgument(f"unknown quantization mode {self.mode!r} (choose from {', '.join(MODES)})")

    @classmethod
    def for_mode(cls, mode: str, bits: int | None = None, group_size: int | None = None) -> "QuantSpec":
        """Fill in a mode's own bits and group size where the user gave none."""
        if mode in FP_MODES:
            b, g = FP_MODES[mode]
            return cls(
                bits=b if bits is None else bits,
                group_size=g if group_size is None else group_size,
                mode=mode,
            )
        if bits is None:
            raise InvalidArgument("--bits is required for affine quantization (3, 4, 5, 6 or 8)")
        return cls(bits=bits, group_size=64 if group_size is None else group_size, mode=mode)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(bits=int(d["bits"]), group_size=int(d.get("group_size", 64)), mode=d.get("mode", "affine"))


def should_quantize(component: str, name: str, shape: tuple[int, ...], spec: QuantSpec | None) -> bool:
    """Whether the runtime tensor `name` (of `component`) is stored quantized under `spec`."""
    if spec is None or component not in QUANTIZABLE_COMPONENTS:
        return False
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    if any(part in name for part in _KEEP_FLOAT):
        return False
    return shape[-1] % spec.group_size == 0


def quantize_tensor(name: str, weight, spec: QuantSpec) -> dict:
    """{`<path>.weight`, `<path>.scales`[, `<path>.biases`]} as MLX's quantized layers store them."""
    import mlx.core as mx

    path = name[: -len(".weight")]
    parts = mx.quantize(weight, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    out = {f"{path}.weight": parts[0], f"{path}.scales": parts[1]}
    if len(parts) > 2 and parts[2] is not None:
        out[f"{path}.biases"] = parts[2]
    return out


def quantize_model_from_weights(model, weights_names, spec_for) -> None:
    """Swap in quantized layers wherever the weights carry `<path>.scales`.

    `spec_for(path)` gives the QuantSpec of that layer (they may differ per layer in a stored model).
    """
    import mlx.nn as nn

    names = set(weights_names)

    def predicate(path, module):
        if f"{path}.scales" not in names or not hasattr(module, "to_quantized"):
            return False
        s = spec_for(path)
        return {"group_size": s.group_size, "bits": s.bits, "mode": s.mode}

    nn.quantize(model, class_predicate=predicate)
    from mflux.runtime import device

    cuda = device.cuda()
    if cuda:  # large inputs dequantize just before a float matmul
        cuda.qmatmul.use_backend_matmul(model)
