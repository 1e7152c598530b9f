"""Black Forest Labs single-file transformer checkpoints -> runtime names.

Sources it takes, each one `.safetensors` file holding only the FLUX.1 transformer:
- BFL's own `flux1-schnell.safetensors` / `flux1-dev.safetensors` (keys such as
  `double_blocks.0.img_attn.qkv.weight`, `single_blocks.0.linear1.weight`);
- the same with ComfyUI's `model.diffusion_model.` prefix, or a bare `diffusion_model.` prefix.

The runtime keeps BFL's names and fused layouts, so the plan only strips the prefix. A file that also
carries a VAE or text encoders (a full ComfyUI checkpoint) is refused, naming those keys.
"""

import mlx.utils
from mflux.converters.plan import Plan, Target

from mflux.errors import MfluxError
from mflux.runtime.model import Flux, FluxParams

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
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


def shapes(source) -> dict[str, tuple[int, ...]]:
    """Shapes by runtime name, for the keys under the transformer's prefix."""
    p = prefix(source.keys())
    return {k[len(p) :]: tuple(source.shape(k)) for k in source.keys() if k.startswith(p)}


def plan(source) -> Plan:
    """Map a BFL single file onto the runtime's transformer names (only the prefix is stripped)."""
    keys = source.keys()
    p = prefix(keys)
    _check_transformer_only(keys, p)
    found = shapes(source)
    _check_flux(found)
    # The expected names come from an empty module of the file's sizes; mlx builds it lazily.
    expected = [k for k, _ in mlx.utils.tree_flatten(Flux(params(source)).parameters())]
    return Plan([Target(k, (p + k,)) for k in expected])


def detect_variant(source) -> str:
    """'dev' when the file has a guidance embedder (`guidance_in`), else 'schnell'."""
    return "dev" if "guidance_in.in_layer.weight" in shapes(source) else "schnell"


def params(source) -> FluxParams:
    """FluxParams from the tensor shapes, refusing sizes that diffusers' FLUX.1 config cannot express."""
    found = shapes(source)
    _check_flux(found)
    p = FluxParams.from_shapes(found)
    if p.mlp_ratio != 4.0 or not p.qkv_bias:
        raise MfluxError(
            f"transformer has mlp ratio {p.mlp_ratio} and qkv bias {p.qkv_bias}: "
            "only FLUX.1 schnell/dev layouts (4.0, with bias) are supported"
        )
    return p


def diffusers_config(source) -> dict:
    """The transformer's config.json as diffusers writes it, from the tensor shapes."""
    p = params(source)
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": p.hidden_size // p.num_heads,
        "axes_dims_rope": list(p.axes_dim),
        "guidance_embeds": p.guidance_embed,
        "in_channels": p.in_channels,
        "joint_attention_dim": p.context_in_dim,
        "num_attention_heads": p.num_heads,
        "num_layers": p.depth,
        "num_single_layers": p.depth_single_blocks,
        "out_channels": None,
        "patch_size": 1,
        "pooled_projection_dim": p.vec_in_dim,
    }


def _check_transformer_only(keys, p: str) -> None:
    others = sorted(k for k in keys if not k.startswith(p))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise MfluxError(
            f"the file holds {len(others)} tensors besides the transformer ({shown}); "
            "give a transformer-only single file, with --base for the rest"
        )


def _check_flux(found: dict) -> None:
    missing = [k for k in _LANDMARKS if k not in found]
    if missing:
        raise MfluxError(
            f"not a FLUX.1 transformer checkpoint: no tensor {missing[0]} "
            "(expected Black Forest Labs names such as double_blocks.0.img_attn.qkv.weight)"
        )
