"""Black Forest Labs single-file transformer checkpoints -> runtime names.

Sources it takes, each one `.safetensors` file holding only the FLUX.1 transformer:
- BFL's own `flux1-schnell.safetensors` / `flux1-dev.safetensors`, and Kontext's, Fill's and Krea's
  (keys such as `double_blocks.0.img_attn.qkv.weight`, `single_blocks.0.linear1.weight`);
- the same with ComfyUI's `model.diffusion_model.` prefix, or a bare `diffusion_model.` prefix.

The runtime keeps BFL's names and fused layouts, so `sanitize` only strips the prefix. The companions
read everything else from the header's shapes (`{name: shape}`, nothing loaded): `check` refuses a
file that is not a transformer only (a full ComfyUI checkpoint), `params` gives the sizes as a plain
dict, `diffusers_config` the config.json diffusers would write.
"""

import re

from mflux.converters.diffusers import count_blocks
from mflux.errors import MfluxError

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# The released models' rope split of a 128-wide head: one axis (unused, zero) and two image axes.
REAL_AXES_DIM = (16, 56, 56)
# Fill's input: the latents 64, the masked image's latents 64 and the mask packed 8x8 per patch, 256.
FILL_IN_CHANNELS = 384
# Tensors every FLUX.1 transformer has; their absence means the file is something else.
_LANDMARKS = (
    "img_in.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
    "final_layer.linear.weight",
)


def prefix(keys) -> str:
    """The prefix in front of the transformer's names: one of PREFIXES, or ''."""
    for p in PREFIXES:
        if any(k.startswith(p + "img_in.") for k in keys):
            return p
    return ""


def sanitize(weights: dict) -> dict:
    """The file's lazily loaded weights under the runtime's names: the prefix stripped."""
    p = prefix(weights)
    return {k.removeprefix(p): v for k, v in weights.items()}


def sanitize_vae(weights: dict, ups: int | None = None) -> dict:
    """BFL's `ae` names (Stable Diffusion's VAE names, as ComfyUI files carry them) -> diffusers' names,
    as diffusers' convert_ldm_vae_checkpoint maps them: `down.i.block.j` -> `down_blocks.i.resnets.j`,
    `up.i` -> `up_blocks.(n-1-i)` (the decoder's blocks run the other way), `mid.block_1/2` ->
    `mid_block.resnets.0/1`, `mid.attn_1` -> `mid_block.attentions.0`. Conv layouts are left to
    diffusers.sanitize_vae. `ups` is the decoder's block count, when `weights` holds only some tensors."""
    ups = ups or count_blocks(weights, "decoder.up")
    return {_diffusers_vae_name(k, ups): v for k, v in weights.items()}


def _diffusers_vae_name(key: str, ups: int) -> str:
    key = re.sub(r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets.", key)
    key = re.sub(r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{ups - 1 - int(m[1])}.", key)
    key = re.sub(r"\.up\.(\d+)\.block\.", r".up_blocks.\1.resnets.", key)
    key = re.sub(r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0.", key)
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    key = re.sub(
        r"\.mid\.attn_1\.(\w+)\.", lambda m: f".mid_block.attentions.0.{attention.get(m[1], m[1])}.", key
    )
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def check(shapes: dict) -> None:
    """Refuse a file that holds more than a FLUX.1 transformer, or something else altogether."""
    p = prefix(shapes)
    others = sorted(k for k in shapes if not k.startswith(p))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise MfluxError(
            f"the file holds {len(others)} tensors besides the transformer ({shown}); "
            "give a transformer-only single file, with --base for the rest"
        )
    missing = [k for k in _LANDMARKS if p + k not in shapes]
    if missing:
        raise MfluxError(
            f"not a FLUX.1 transformer checkpoint: no tensor {missing[0]} "
            "(expected Black Forest Labs names such as double_blocks.0.img_attn.qkv.weight)"
        )


def detect_variant(shapes: dict) -> str:
    """'fill' when `img_in` takes Fill's 384 input channels, else 'dev' when the file has a guidance
    embedder (`guidance_in`), else 'schnell'. A Kontext or Krea file has dev's exact tensors: 'dev'."""
    p = prefix(shapes)
    if tuple(shapes.get(p + "img_in.weight", ()))[1:] == (FILL_IN_CHANNELS,):
        return "fill"
    return "dev" if any(k.startswith(p + "guidance_in.") for k in shapes) else "schnell"


def params(shapes: dict) -> dict:
    """The transformer's sizes (FluxParams' fields) from the shapes of BFL-named tensors.

    Every size shows in some tensor except the rope split of a head, which no weight carries: it is
    the released (16, 56, 56) scaled to the head width, each image axis getting 56/128 of it rounded
    to an even count and the first axis the rest. Heads of 128, 64 and 32 give (16, 56, 56),
    (8, 28, 28) and (4, 14, 14).
    """
    p = prefix(shapes)
    s = {k.removeprefix(p): tuple(v) for k, v in shapes.items() if k.startswith(p)}
    try:
        hidden, in_channels = s["img_in.weight"]
        head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return {
            "in_channels": in_channels,
            "out_channels": s["final_layer.linear.weight"][0],
            "hidden_size": hidden,
            "num_heads": hidden // head_dim,
            "depth": count_blocks(s, "double_blocks"),
            "depth_single_blocks": count_blocks(s, "single_blocks"),
            "axes_dim": _scaled_axes(head_dim),
            "context_in_dim": s["txt_in.weight"][1],
            "vec_in_dim": s["vector_in.in_layer.weight"][1],
            "guidance_embed": "guidance_in.in_layer.weight" in s,
            "mlp_ratio": s["double_blocks.0.img_mlp.0.weight"][0] / hidden,
            "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in s,
        }
    except KeyError as e:
        raise MfluxError(f"not a FLUX.1 transformer checkpoint: no tensor {e.args[0]}") from None


def diffusers_config(shapes: dict) -> dict:
    """The transformer's config.json as diffusers writes it, refusing sizes it cannot express."""
    check(shapes)
    p = params(shapes)
    if p["mlp_ratio"] != 4.0 or not p["qkv_bias"]:
        raise MfluxError(
            f"transformer has mlp ratio {p['mlp_ratio']} and qkv bias {p['qkv_bias']}: "
            "only FLUX.1 schnell/dev layouts (4.0, with bias) are supported"
        )
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": p["hidden_size"] // p["num_heads"],
        "axes_dims_rope": list(p["axes_dim"]),
        "guidance_embeds": p["guidance_embed"],
        "in_channels": p["in_channels"],
        "joint_attention_dim": p["context_in_dim"],
        "num_attention_heads": p["num_heads"],
        "num_layers": p["depth"],
        "num_single_layers": p["depth_single_blocks"],
        "out_channels": None if p["out_channels"] == p["in_channels"] else p["out_channels"],
        "patch_size": 1,
        "pooled_projection_dim": p["vec_in_dim"],
    }


def _scaled_axes(head_dim: int) -> tuple[int, int, int]:
    image_axis = 2 * round(head_dim * REAL_AXES_DIM[1] / sum(REAL_AXES_DIM) / 2)
    first = head_dim - 2 * image_axis
    if first <= 0 or first % 2:
        raise MfluxError(f"cannot split a head of width {head_dim} into three even rope axes")
    return first, image_axis, image_axis
