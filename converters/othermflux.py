"""The other MLX port's saved FLUX.1 models (PyPI `mflux` 0.x, its `mflux-save`) -> the runtime's names.

That project shares our name but nothing else. Its saver writes one folder per component
(`transformer`, `text_encoder_2` for T5, `text_encoder` for CLIP, `vae`), shards `0.safetensors`,
`1.safetensors`, ... holding its own modules' parameter names, with `quantization_level` (the bits, or
"None") in every shard's metadata. It quantizes every Linear and Embedding of all four components with
`nn.quantize` at group size 64 (its FLUX.1 weight definition sets no other), so a quantized layer is
MLX's own affine layout, `<path>.weight` (uint32, packed), `<path>.scales` and `<path>.biases`: it is
taken as it is, never dequantized, except where `dequantize` is asked to (the caller's rule on what
stays float). Checked against its 0.24.0 saver (tests/othermflux_layout.json).

Its names, against ours:
- transformer: diffusers' names, but the feed-forwards' `ff.net.0.proj` / `ff.net.2` are
  `ff.linear1` / `ff.linear2` (and `ff_context`'s). From there diffusers' `sanitize_transformer`
  fuses q/k/v and swaps the final norm's halves; a packed weight's rows are its output rows, so that
  row concatenation and swap act the same on `.weight`, `.scales` and `.biases`.
- T5: `t5_blocks.N.attention.` is Hugging Face's `encoder.block.N.layer.0.`, `t5_blocks.N.ff.` is
  `encoder.block.N.layer.1.`; every block holds a copy of block 0's relative attention bias (its
  mapping loads that one into all of them), of which block 0's is kept.
- CLIP: Hugging Face's own names (`text_model.`).
- VAE: diffusers' names with `conv_in.conv2d`, `conv_out.conv2d` and `conv_norm_out.norm` for
  `conv_in`, `conv_out`, `conv_norm_out`; convolutions are already OHWI.
"""

import re

import mlx.core as mx

from mflux.converters import diffusers
from mflux.errors import MfluxError

GROUP_SIZE = 64
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
BITS = (2, 3, 4, 5, 6, 8)  # what its loader reads back (the caller refuses what the runtime lacks)
_QUANT_LEAVES = ("scales", "biases")
_T5_RENAMES = (
    (re.compile(r"^t5_blocks\.(\d+)\.attention\."), r"encoder.block.\1.layer.0."),
    (re.compile(r"^t5_blocks\.(\d+)\.ff\."), r"encoder.block.\1.layer.1."),
    (re.compile(r"^final_layer_norm\."), "encoder.final_layer_norm."),
)
_VAE_RENAMES = (
    (re.compile(r"\.conv_in\.conv2d\."), ".conv_in."),
    (re.compile(r"\.conv_out\.conv2d\."), ".conv_out."),
    (re.compile(r"\.conv_norm_out\.norm\."), ".conv_norm_out."),
)
_FF_RENAMES = (
    (re.compile(r"\.(ff|ff_context)\.linear1\."), r".\1.net.0.proj."),
    (re.compile(r"\.(ff|ff_context)\.linear2\."), r".\1.net.2."),
)
_RELATIVE_BIAS = re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.")


def quantization_level(metadata: dict) -> int | None:
    """The bits a shard's metadata records, None for an unquantized save."""
    level = (metadata or {}).get("quantization_level")
    if level in (None, "", "None", "null"):
        return None
    try:
        return int(level)
    except ValueError:
        raise MfluxError(f"quantization_level {level!r} in the metadata is not a number of bits") from None


def layer_bits(weight_shape: tuple, scales_shape: tuple, name: str) -> int:
    """The bits of one quantized layer, from its packed width and its count of 64-wide groups."""
    in_dims = scales_shape[-1] * GROUP_SIZE
    bits, rest = divmod(weight_shape[-1] * 32, in_dims)
    if rest or bits not in BITS:
        raise MfluxError(
            f"{name}: a packed width of {weight_shape[-1]} with {scales_shape[-1]} groups is not an affine "
            f"quantization at group size {GROUP_SIZE} (is this a model saved by the other mflux?)"
        )
    return bits


def logical_shapes(weights: dict) -> dict[str, tuple[int, ...]]:
    """{name: the float shape it stands for}: a packed weight counts its unpacked input width;
    `.scales` and `.biases` are left out."""
    shapes = {}
    for name, arr in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf in _QUANT_LEAVES and f"{path}.weight" in weights:
            continue
        shape = tuple(arr.shape)
        if leaf == "weight" and f"{path}.scales" in weights:
            shape = (*shape[:-1], weights[f"{path}.scales"].shape[-1] * GROUP_SIZE)
        shapes[name] = shape
    return shapes


def quantized_layers(weights: dict) -> dict[str, int]:
    """{layer path: bits} of every quantized layer."""
    return {
        name[: -len(".scales")]: layer_bits(
            weights[name[: -len(".scales")] + ".weight"].shape, arr.shape, name[: -len(".scales")]
        )
        for name, arr in weights.items()
        if name.endswith(".scales") and name[: -len(".scales")] + ".weight" in weights
    }


def dequantize(weights: dict, path: str) -> None:
    """Replace the quantized layer `path` by its float weight, as MLX's QuantizedLinear computes it."""
    w, scales, biases = (weights.pop(f"{path}.{leaf}") for leaf in ("weight", "scales", "biases"))
    bits = layer_bits(w.shape, scales.shape, path)
    weights[f"{path}.weight"] = mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=bits)


def sanitize(component: str, weights: dict) -> dict:
    """One component's lazily loaded weights under the runtime's names, quantized layers kept packed."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r} ({', '.join(COMPONENTS)})")
    if component == "transformer":
        return sanitize_transformer(weights)
    if component == "text_encoder_2":
        return sanitize_t5(weights)
    if component == "vae":
        return _renamed(weights, _VAE_RENAMES)
    return dict(weights)


def sanitize_transformer(weights: dict) -> dict:
    """Its transformer -> Black Forest Labs' names. Each leaf (`.weight`, `.scales`, `.biases`) is fused
    on its own by diffusers' sanitize, which concatenates rows. A fused group whose parts are not all
    quantized alike is dequantized first (exactly), since packed rows of other widths can't be stacked."""
    weights = _renamed(weights, _FF_RENAMES)
    for group in _fused_groups(weights):
        layouts = {_layout_of(weights, p) for p in group}
        if len(layouts) > 1:
            for p in group:
                if f"{p}.scales" in weights:
                    dequantize(weights, p)
    leaves = {leaf: {} for leaf in _QUANT_LEAVES}
    rest = {}
    for name, arr in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf in _QUANT_LEAVES and f"{path}.weight" in weights:
            leaves[leaf][f"{path}.weight"] = arr  # named as a weight, so the same rule fuses it
        else:
            rest[name] = arr
    out = diffusers.sanitize_transformer(rest)
    for leaf, arrays in leaves.items():
        for name, arr in diffusers.sanitize_transformer(arrays).items():
            out[name.removesuffix(".weight") + f".{leaf}"] = arr
    return out


def sanitize_t5(weights: dict) -> dict:
    """Its T5 -> Hugging Face's names, keeping block 0's relative attention bias (the others are copies)."""
    out = {}
    for name, arr in _renamed(weights, _T5_RENAMES).items():
        m = _RELATIVE_BIAS.match(name)
        if m and m.group(1) != "0":
            continue
        out[name] = arr
    return out


def _renamed(weights: dict, rules) -> dict:
    out = {}
    for name, arr in weights.items():
        for pattern, repl in rules:
            name = pattern.sub(repl, name)
        out[name] = arr
    return out


def _fused_groups(weights: dict) -> list[tuple[str, ...]]:
    """The diffusers module paths that become one fused runtime matrix (q/k/v, linear1)."""
    groups = []
    for prefix, table in (
        ("transformer_blocks", diffusers.DOUBLE_BLOCK_MODULES),
        ("single_transformer_blocks", diffusers.SINGLE_BLOCK_MODULES),
    ):
        for i in range(diffusers.count_blocks(weights, prefix)):
            groups += [tuple(f"{prefix}.{i}.{m}" for m in mods) for mods in table if isinstance(mods, tuple)]
    return groups


def _layout_of(weights: dict, path: str):
    # None for a float layer; else the packed and group widths, equal across parts of one input width
    # exactly when their bits are equal.
    if f"{path}.scales" not in weights:
        return None
    return weights[f"{path}.weight"].shape[-1], weights[f"{path}.scales"].shape[-1]
