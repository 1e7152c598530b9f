"""Pulling a FLUX.1 model saved by the other MLX port (PyPI `mflux` 0.x, an unrelated project): its
folders become an MLX-native store model at pull time, quantized layers kept as they are.

`mflux pull ORG/NAME` tells the format from the repo's file list alone, before downloading anything
(mflux.hub): numbered shards such as `transformer/0.safetensors`, and no `transformer/config.json`.
Its repos carry no config files, so the architecture is read from the weights' shapes
(`architecture`); what no shape carries is what that port hard-codes for FLUX.1: CLIP heads 64 wide,
T5's 128 relative distance, the VAE's 32 norm groups and latent scale and shift, and schnell's or
dev's scheduler.

Layers its saver quantized stay packed, except where `should_quantize` keeps a tensor in float (the
VAE's attention, CLIP's position embedding, T5's relative attention bias) and where the runtime has
no such bits (2): those are dequantized, which gives exactly the values its own quantized layers
compute. The manifest records the quantization (bits per component at group size 64, `layers` where
a layer differs) and the source format.
"""

import shutil
from pathlib import Path

import mlx.core as mx

from mflux.converters import bfl, diffusers, othermflux
from mflux.errors import MfluxError
from mflux.manifest import new_manifest, write_manifest
from mflux.runtime.folder import detect_variant
from mflux.runtime.loader import build_module, check_keys, stream
from mflux.runtime.quantization import AFFINE_BITS, QuantSpec, quantize_model_from_weights, should_quantize
from mflux.runtime.weights import SafetensorsFile, save_shards

WEIGHTS = othermflux.COMPONENTS
TOKENIZERS = ("tokenizer", "tokenizer_2")
MAX_SHARD_BYTES = 2**30  # as `mflux convert` writes
# What no weight shows (the other port hard-codes them for FLUX.1; the real configs' values).
CLIP_HEAD_DIM = 64
CLIP = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2}
T5 = {
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "norm_num_groups": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
}
SHIFT = {"schnell": {"shift": 1.0, "use_dynamic_shifting": False}}
DEV_SHIFT = {"shift": 3.0, "use_dynamic_shifting": True}


def convert(downloaded: Path, out: Path, *, name: str, source: dict, variant: str | None = None) -> None:
    """Write the model in `downloaded` (that port's folders) into the empty build folder `out` as an
    MLX-native model with its manifest. `variant` names what the files can't tell (krea is dev's)."""
    weights = {c: _read(downloaded / c) for c in WEIGHTS}
    arch = architecture({c: othermflux.logical_shapes(w) for c, (w, _) in weights.items()})
    variant = detect_variant(arch, variant)
    arch["scheduler"] = {**SCHEDULER, **SHIFT.get(variant, DEV_SHIFT)}
    dtype = _float_dtype(weights["transformer"][0])
    arch["text_encoder_2"]["dtype"] = _float_dtype(weights["text_encoder_2"][0])
    quantization, levels = {}, {}
    for c in WEIGHTS:
        tensors, level = weights.pop(c)
        levels[c] = level
        spec = _write_component(c, tensors, arch, out / c, downloaded / c)
        if spec:
            quantization[c] = spec
    for t in TOKENIZERS:
        shutil.copytree(downloaded / t, out / t)
    record = dict(source)
    if any(levels.values()):
        record["quantization_level"] = str(max(v for v in levels.values() if v))
    manifest = new_manifest(
        out,
        name=name,
        format="mlx",
        dtype=dtype,
        source=record,
        quantization=quantization,
        architecture=arch,
        variant=variant,
    )
    write_manifest(out, manifest)


def _float_dtype(weights: dict) -> str:
    """The dtype of a component's float tensors (its saves hold the precision it loaded in)."""
    for arr in weights.values():
        if mx.issubdtype(arr.dtype, mx.floating):
            return {mx.float32: "float32", mx.float16: "float16"}.get(arr.dtype, "bfloat16")
    return "bfloat16"


def _read(folder: Path) -> tuple[dict, int | None]:
    """A component's shards, lazily (headers checked first), in the runtime's names, and its bits."""
    shards = sorted(folder.glob("*.safetensors"), key=lambda p: (len(p.name), p.name))
    if not shards:
        raise MfluxError(f"{folder}: no .safetensors shards (is the download complete?)")
    weights, levels = {}, set()
    for shard in shards:
        header = SafetensorsFile(shard)
        levels.add(othermflux.quantization_level(header.metadata))
        weights.update(mx.load(str(shard)))
    level = max((v for v in levels if v is not None), default=None)
    return othermflux.sanitize(folder.name, weights), level


def _write_component(component: str, weights: dict, arch: dict, out: Path, where: Path) -> dict | None:
    """Write one component's shards; returns its quantization for the manifest (None: not quantized)."""
    weights, layers = prepare(component, weights, arch, str(where))
    save_shards(stream(weights), out, max_shard_bytes=MAX_SHARD_BYTES)
    return _quantization(layers)


def prepare(component: str, weights: dict, arch: dict, where: str) -> tuple[dict, dict[str, int]]:
    """A sanitized component's weights made ready to write, lazily: what stays float by our rule
    (`should_quantize`) dequantized, and the names checked against the module of `arch`, quantized
    where the weights are. Returns the weights and {layer path: bits} of those left packed."""
    shapes = othermflux.logical_shapes(weights)
    for path, bits in othermflux.quantized_layers(weights).items():
        spec = QuantSpec(bits, othermflux.GROUP_SIZE) if bits in AFFINE_BITS else None
        if spec is None or not should_quantize(component, f"{path}.weight", shapes[f"{path}.weight"], spec):
            othermflux.dequantize(weights, path)  # exact: what its QuantizedLinear computes
    layers = othermflux.quantized_layers(weights)
    module = build_module(component, arch)
    quantize_model_from_weights(module, weights, lambda path: QuantSpec(layers[path], othermflux.GROUP_SIZE))
    check_keys(weights, module, where)
    return weights, layers


def _quantization(layers: dict[str, int]) -> dict | None:
    """{bits, group_size, mode} of the most common bits, with `layers` overrides for the others."""
    if not layers:
        return None
    counts = {}
    for bits in layers.values():
        counts[bits] = counts.get(bits, 0) + 1
    main = max(counts, key=counts.get)
    spec = QuantSpec(main, othermflux.GROUP_SIZE).to_dict()
    others = {p: {"bits": b} for p, b in sorted(layers.items()) if b != main}
    return {**spec, "layers": others} if others else spec


def architecture(shapes: dict[str, dict]) -> dict:
    """Each component's config values, under Hugging Face's key names, from the runtime-named logical
    shapes (`othermflux.logical_shapes`) of the four components."""
    return {
        "transformer": {
            k: v
            for k, v in bfl.diffusers_config(shapes["transformer"]).items()
            if k != "_class_name" and v is not None
        },
        "text_encoder": _clip(shapes["text_encoder"]),
        "text_encoder_2": _t5(shapes["text_encoder_2"]),
        "vae": _vae(shapes["vae"]),
    }


def _clip(s: dict) -> dict:
    vocab, hidden = _shape(s, "text_model.embeddings.token_embedding.weight")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(s, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": _count(s, "text_model.encoder.layers"),
        "num_attention_heads": max(hidden // CLIP_HEAD_DIM, 1),
        "max_position_embeddings": _shape(s, "text_model.embeddings.position_embedding.weight")[0],
        **CLIP,
    }


def _t5(s: dict) -> dict:
    vocab, d_model = _shape(s, "shared.weight")
    buckets, heads = _shape(s, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = _shape(s, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": _shape(s, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
        "num_layers": _count(s, "encoder.block"),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        **T5,
    }


def _vae(s: dict) -> dict:
    blocks = _count(s, "encoder.down_blocks")
    return {
        "latent_channels": _shape(s, "decoder.conv_in.weight")[-1],  # OHWI: its input is the latents
        "block_out_channels": [
            _shape(s, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(blocks)
        ],
        "layers_per_block": _count(s, "encoder.down_blocks.0.resnets"),
        **VAE,
    }


def _shape(shapes: dict, name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise MfluxError(f"no tensor {name} (is this a complete FLUX.1 model saved by the other mflux?)")
    return shapes[name]


def _count(shapes: dict, prefix: str) -> int:
    n = diffusers.count_blocks(shapes, prefix)
    if not n:
        raise MfluxError(
            f"no tensors under {prefix} (is this a complete FLUX.1 model saved by the other mflux?)"
        )
    return n
