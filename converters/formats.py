"""Single-file checkpoints as people share them: what a file holds, told from its content, and its
tensors as exact float32.

`detect_format(tensors)` reads a file's tensor table ({name: (dtype, shape)}, nothing loaded) and
returns a `Format`: the container, the transformer's key names (Black Forest Labs' or diffusers'),
which pipeline components the file holds under which prefix, its tensor types and whether it is
"scaled fp8". Never the file's name. Layouts recognised:
- a transformer alone, in BFL names (bare, or ComfyUI's `model.diffusion_model.` / `diffusion_model.`)
  or in diffusers' names (a fine-tune's `diffusion_pytorch_model.safetensors`);
- a ComfyUI all-in-one checkpoint (its `supported_models.Flux`): the transformer under
  `model.diffusion_model.`, CLIP-L under `text_encoders.clip_l.transformer.`, T5-XXL under
  `text_encoders.t5xxl.transformer.` (both in Hugging Face's names) and the VAE under `vae.` in BFL's
  `ae` names (see bfl.sanitize_vae).
Tensor types: BF16, F16, F32, and float8 (F8_E4M3 = float8_e4m3fn, F8_E5M2), where a "scaled fp8"
file carries `<layer>.scale_weight` beside `<layer>.weight`: the weight is `w.float() * scale_weight`.
`to_float32` gives every source type's exact float32 value; one cast after it is the single rounding.
"""

from dataclasses import dataclass

import mlx.core as mx

from mflux.converters import bfl, diffusers
from mflux.errors import MfluxError

# component -> its prefix in a ComfyUI all-in-one file
ALL_IN_ONE = {
    "transformer": "model.diffusion_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.t5xxl.transformer.",
    "vae": "vae.",
}
FLOAT8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# the tensor types read, in the order a Format names them
FLOATS = {**FLOAT8, "BF16": "bfloat16", "F16": "float16", "F32": "float32"}
SCALE = ".scale_weight"
# Scaled-fp8 files mark themselves with an empty `scaled_fp8` tensor, and some carry `<layer>.scale_input`:
# an activation scale for fp8 matmuls, which a dequantized weight does not use.
_IGNORED = ("scaled_fp8", ".scale_input")


@dataclass(frozen=True)
class Format:
    """What a single file holds. GGUF joins with container "gguf"."""

    container: str  # "safetensors"
    names: str  # the transformer's key names: "bfl" or "diffusers"
    prefixes: dict  # component -> the key prefix of its tensors, for each component the file holds
    dtypes: tuple  # the file's tensor types, e.g. ("F8_E4M3", "BF16")
    scaled: bool  # float8 weights with a per-layer scale_weight

    def describe(self) -> str:
        """One phrase for the manifest and messages, e.g. "safetensors float8_e4m3fn+bfloat16 (scaled),
        BFL names, transformer only, prefix model.diffusion_model."."""
        types = "+".join(FLOATS.get(d, d) for d in self.dtypes) + (" (scaled)" if self.scaled else "")
        where = "all-in-one" if len(self.prefixes) > 1 else _prefix_text(self.prefixes["transformer"])
        return f"{self.container} {types}, {'BFL' if self.names == 'bfl' else 'diffusers'} names, {where}"


def detect_format(tensors: dict, container: str = "safetensors") -> Format:
    """The Format of a file's tensor table {name: (dtype, shape)}; refuses tensor types it cannot read
    and tensors outside every known layout, naming them."""
    keys = [k for k in tensors if not _ignored(k)]
    unreadable = sorted({d for k, (d, _) in tensors.items() if d not in FLOATS and not _ignored(k)})
    if unreadable:
        shown = next(k for k, (d, _) in tensors.items() if d == unreadable[0])
        raise MfluxError(
            f"tensor type {unreadable[0]} (e.g. {shown}) is not one mflux converts (it reads "
            f"{', '.join(FLOATS)})"
        )
    prefixes = _all_in_one(keys) or {"transformer": bfl.prefix(keys)}
    names = "diffusers" if _transformer_keys(keys, prefixes["transformer"]) & {"x_embedder.weight"} else "bfl"
    outside = sorted(k for k in keys if not k.startswith(tuple(prefixes.values())))
    if outside:
        raise MfluxError(
            f"{len(outside)} tensors fit no known layout ({_shown(outside)}): mflux reads a FLUX.1 "
            f"transformer alone, or ComfyUI's all-in-one prefixes {', '.join(ALL_IN_ONE.values())}"
        )
    dtypes = tuple(sorted({tensors[k][0] for k in keys}, key=list(FLOATS).index))
    scaled = any(k.endswith(SCALE) for k in keys)
    return Format(container, names, prefixes, dtypes, scaled)


def component_keys(fmt: Format, component: str, tensors: dict) -> dict:
    """{name without the prefix: (file key, its scale_weight key or None)} of one component, scales
    and ignored markers left out."""
    prefix = fmt.prefixes[component]
    out = {}
    for key in tensors:
        if not key.startswith(prefix) or _ignored(key) or key.endswith(SCALE):
            continue
        scale = key.removesuffix(".weight") + SCALE
        out[key.removeprefix(prefix)] = (key, scale if scale in tensors else None)
    if component == "text_encoder_2" and "shared.weight" in out:
        out.pop("encoder.embed_tokens.weight", None)  # tied to `shared`: one copy is stored
    orphans = [k for k in tensors if k.startswith(prefix) and k.endswith(SCALE)]
    orphans = [k for k in orphans if k.removesuffix(SCALE) + ".weight" not in tensors]
    if orphans:
        raise MfluxError(f"scale tensor {orphans[0]} has no weight beside it (is the file complete?)")
    return out


def groups(fmt: Format, component: str, names) -> list[tuple[str, ...]]:
    """The component's tensor names in groups that are renamed together: diffusers' q, k and v (and a
    single block's MLP input) fuse into one tensor; every other tensor stands alone."""
    names = list(names)
    if component != "transformer" or fmt.names != "diffusers":
        return [(n,) for n in names]
    fused = diffusers.transformer_groups(names)
    grouped = {n for g in fused for n in g}
    return fused + [(n,) for n in names if n not in grouped]


def sanitize(fmt: Format, component: str, weights: dict, names) -> dict:
    """Some of one component's weights (names without the prefix) under the runtime's names; `names`
    are all of the component's names."""
    if component == "transformer":
        return diffusers.sanitize_transformer(weights) if fmt.names == "diffusers" else dict(weights)
    if component == "vae":
        return diffusers.sanitize_vae(bfl.sanitize_vae(weights, diffusers.count_blocks(names, "decoder.up")))
    return diffusers.sanitize(component, weights)


def to_float32(arr: mx.array, dtype: str, scale: mx.array | None = None) -> mx.array:
    """A tensor's exact float32 value: float8 (its bytes as uint8) decoded, then times its scale."""
    if dtype == "F8_E4M3":
        arr = mx.from_fp8(arr, dtype=mx.float32)
    elif dtype == "F8_E5M2":  # e5m2 is the high byte of a float16
        arr = (arr.astype(mx.uint16) << 8).view(mx.float16).astype(mx.float32)
    else:
        arr = arr.astype(mx.float32)
    return arr if scale is None else arr * scale.astype(mx.float32)


def _all_in_one(keys) -> dict | None:
    found = {c: p for c, p in ALL_IN_ONE.items() if any(k.startswith(p) for k in keys)}
    return found if len(found) > 1 and "transformer" in found else None


def _transformer_keys(keys, prefix: str) -> set:
    return {k.removeprefix(prefix) for k in keys if k.startswith(prefix)}


def _ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _IGNORED[0] or key.endswith(_IGNORED[1])


def _prefix_text(prefix: str) -> str:
    return f"transformer only, prefix {prefix}" if prefix else "transformer only"


def _shown(names: list) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
