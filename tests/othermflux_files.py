"""FLUX.1 models as the other MLX port (PyPI `mflux` 0.24.0, an unrelated project) saves them, built
from a tiny diffusers pipeline, and the diffusers folder that holds their dequantized weights.

Its saver (`ModelSaver.save_model`) writes each component's `tree_flatten(module.parameters())` under
its own module names into `<component>/0.safetensors`, `1.safetensors`, ... (a new shard past 2 GiB),
each with metadata {quantization_level, mflux_version}, and `model.safetensors.index.json`; the
tokenizers as transformers saves them. It quantizes every Linear and Embedding (`nn.quantize`, group
size 64). The names and layout here were checked against what that saver writes for a full-size
FLUX.1 (tests/othermflux_layout.json, recorded with its 0.24.0 in a separate virtual environment; see
tests/test_pull_other_format.py). The renames below are written from that layout, in the other
direction from mflux's converter (converters/othermflux.py), so the two check each other.

Checked once by hand as well: from the same tiny pipeline, that port's own loader (its weight mapping)
and saver, at 8 bits, wrote every tensor of the transformer, T5 and CLIP equal to `build_other_save`'s,
byte for byte, with the same metadata; the VAE's too, its hard-coded full-size module adding only two
conv_shortcut layers the tiny VAE lacks.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np

GROUP_SIZE = 64
VERSION = "0.24.0"
WEIGHTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
# (diffusers / Hugging Face name part, the other port's), per component; N stands for a block number
# and ^ anchors at the start.
RENAMES = {
    "transformer": [
        (".ff.net.0.proj.", ".ff.linear1."),
        (".ff.net.2.", ".ff.linear2."),
        (".ff_context.net.0.proj.", ".ff_context.linear1."),
        (".ff_context.net.2.", ".ff_context.linear2."),
    ],
    "text_encoder_2": [
        ("^encoder.block.N.layer.0.", "^t5_blocks.N.attention."),
        ("^encoder.block.N.layer.1.", "^t5_blocks.N.ff."),
        ("^encoder.final_layer_norm.", "^final_layer_norm."),
    ],
    "text_encoder": [],
    "vae": [
        (".conv_in.", ".conv_in.conv2d."),
        (".conv_out.", ".conv_out.conv2d."),
        (".conv_norm_out.", ".conv_norm_out.norm."),
    ],
}


def build_other_save(
    diffusers_folder: Path, out: Path, bits: int | None, *, bits_for=None, max_shard_bytes: int = 2 << 30
) -> Path:
    """Write the pipeline in `diffusers_folder` into the new folder `out` as the other port's saver
    would after loading it with `-q bits` (None: unquantized, bf16). `bits_for(component, name)` gives
    a layer other bits (a mixed save); layers whose input width is not a multiple of 64 stay float (the
    real FLUX.1 has none)."""
    import mlx.core as mx

    out.mkdir(parents=True)
    for component in WEIGHTS:
        weights = {k: v.astype(mx.bfloat16) for k, v in other_names(component, diffusers_folder).items()}
        if bits is not None:
            weights = _quantized(component, weights, bits, bits_for)
        _write_shards(weights, out / component, bits, max_shard_bytes)
    for t in ("tokenizer", "tokenizer_2"):
        shutil.copytree(diffusers_folder / t, out / t)
    return out


def other_names(component: str, diffusers_folder: Path) -> dict:
    """A diffusers component's weights under the other port's names and layouts (lazy mx arrays)."""
    import mlx.core as mx

    weights = {}
    for f in sorted((diffusers_folder / component).glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    out = {}
    for name, arr in weights.items():
        if name.endswith("position_ids") or name == "encoder.embed_tokens.weight":
            continue
        if component == "vae" and arr.ndim == 4:
            arr = arr.transpose(0, 2, 3, 1)  # its convolutions are MLX's OHWI
        out[_rename(component, name)] = arr
    if component == "text_encoder_2":  # its mapping loads block 0's relative bias into every block
        bias = out.pop("t5_blocks.0.attention.SelfAttention.relative_attention_bias.weight")
        blocks = {int(m.group(1)) for k in out if (m := re.match(r"t5_blocks\.(\d+)\.", k))}
        for i in sorted(blocks):
            out[f"t5_blocks.{i}.attention.SelfAttention.relative_attention_bias.weight"] = bias
    return out


def _rename(component: str, name: str, to_other: bool = True) -> str:
    for pair in RENAMES[component]:
        src, dst = pair if to_other else pair[::-1]
        pattern = ("^" if src.startswith("^") else "") + re.escape(src.lstrip("^")).replace("N", r"(\d+)")
        name = re.sub(pattern, dst.lstrip("^").replace("N", r"\1"), name)
    return name


def diffusers_name(component: str, other: str) -> str:
    """The other port's name back to diffusers'."""
    return _rename(component, other, to_other=False)


def _quantized(component: str, weights: dict, bits: int, bits_for) -> dict:
    import mlx.core as mx

    out = {}
    for name, arr in weights.items():
        if name.endswith(".weight") and arr.ndim == 2 and arr.shape[-1] % GROUP_SIZE == 0:
            b = (bits_for(component, name) if bits_for else None) or bits
            w, scales, biases = mx.quantize(arr, group_size=GROUP_SIZE, bits=b)
            path = name[: -len(".weight")]
            out.update({f"{path}.weight": w, f"{path}.scales": scales, f"{path}.biases": biases})
        else:
            out[name] = arr
    return out


def _write_shards(weights: dict, folder: Path, bits: int | None, max_shard_bytes: int) -> None:
    import mlx.core as mx

    folder.mkdir(parents=True)
    meta = {"quantization_level": str(bits), "mflux_version": VERSION}
    shards, size = [{}], 0
    for name, arr in weights.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        mx.save_safetensors(str(folder / f"{i}.safetensors"), shard, meta)
        weight_map.update(dict.fromkeys(shard, f"{i}.safetensors"))
    index = {"metadata": meta, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def dequantized(save: Path, component: str) -> dict[str, np.ndarray]:
    """The save's own dequantization of a component, as its QuantizedLinear computes each weight, under
    diffusers' names (float32 numpy; block 0's T5 relative bias once, as diffusers holds it)."""
    import mlx.core as mx

    weights = {}
    for f in sorted((save / component).glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    out = {}
    for name, arr in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{path}.weight" in weights:
            continue
        if f"{path}.scales" in weights and leaf == "weight":
            scales = weights[f"{path}.scales"]
            b = arr.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            arr = mx.dequantize(arr, scales, weights[f"{path}.biases"], group_size=GROUP_SIZE, bits=b)
        out[diffusers_name(component, name)] = arr
    if component == "text_encoder_2":
        for k in [k for k in out if "relative_attention_bias" in k and not k.startswith("encoder.block.0.")]:
            del out[k]
    if component == "vae":
        out = {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in out.items()}
    # contiguous: safetensors.numpy writes a strided array's buffer as it lies in memory
    return {k: np.ascontiguousarray(v.astype(mx.float32)) for k, v in out.items()}


def diffusers_reference(save: Path, diffusers_folder: Path, out: Path) -> Path:
    """A copy of `diffusers_folder` whose weights are the save's own dequantization, in float32."""
    from safetensors.numpy import save_file

    shutil.copytree(diffusers_folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    for component in WEIGHTS:
        save_file(dequantized(save, component), str(out / component / _single_file(component)))
    return out


def _single_file(component: str) -> str:
    return (
        "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    )
