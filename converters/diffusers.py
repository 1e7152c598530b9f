"""diffusers / Hugging Face names -> the runtime's names, on lazily loaded weights.

`sanitize(component, weights)` takes a dict of `mx.array`s as `mx.load` gives them (nothing read yet)
and returns the runtime's names; every operation is lazy, so nothing is read before it is evaluated.
Keys it does not know pass through unchanged, so the loader's key-set check names them.

The transformer keeps Black Forest Labs' names and fused layouts, so its sanitize is the inverse of
diffusers' `convert_flux_transformer_checkpoint_to_diffusers`: q/k/v (and the single blocks' MLP input)
are concatenated back into one matrix, norms' `weight` becomes `scale`, and the final modulation's two
halves go back from (scale, shift) to (shift, scale). T5 and CLIP keep Hugging Face's names, and the
VAE diffusers' names with conv weights OIHW -> OHWI. Redux's SigLIP vision tower (image_encoder) keeps
Hugging Face's names with its patch conv OIHW -> OHWI; its embedder (image_embedder) keeps diffusers'.
"""

import re
from collections.abc import Iterable

import mlx.core as mx

from mflux.errors import MfluxError

# diffusers module -> Black Forest Labs module. A tuple of diffusers modules is concatenated along the
# output axis, in that order.
TOP_MODULES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped
}
GUIDANCE_MODULES = {
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
DOUBLE_BLOCK_MODULES = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn.qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn.qkv",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
SINGLE_BLOCK_MODULES = {
    "norm.linear": "modulation.lin",
    ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"): "linear1",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
_SWAPPED = "final_layer.adaLN_modulation.1"
# diffusers' VAE attention names before 0.15; FLUX's own VAE uses the new ones, older exports the old.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
REDUX_COMPONENTS = ("image_encoder", "image_embedder")  # FLUX.1-Redux-dev's FluxPriorReduxPipeline


def sanitize(component: str, weights: dict) -> dict:
    """One diffusers pipeline component's lazily loaded weights under the runtime's names."""
    if component not in _SANITIZE:
        raise ValueError(f"unknown component {component!r} ({', '.join(COMPONENTS + REDUX_COMPONENTS)})")
    return _SANITIZE[component](weights)


def count_blocks(names: Iterable[str], prefix: str) -> int:
    """How many `<prefix>.N.` blocks the names hold (the highest N plus one)."""
    found = {int(m.group(1)) for k in names if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def sanitize_transformer(weights: dict) -> dict:
    """diffusers' FluxTransformer2DModel -> Black Forest Labs' names, fusing q/k/v lazily.

    Block counts and the guidance embedder are read from the names. A fused matrix with some of its
    parts missing is refused here, naming the part; anything else missing or left over is for the
    loader's key-set check.
    """
    rest = dict(weights)
    out = {}
    for name, sources, combine in _targets(*_layout(rest)):
        present = [s for s in sources if s in rest]
        if not present:
            continue  # the whole tensor is absent: the key-set check names it
        if len(present) < len(sources):
            missing = next(s for s in sources if s not in rest)
            raise MfluxError(
                f"missing tensor {missing}, needed for {name} (is this a complete FLUX.1 checkpoint?)"
            )
        arrays = [rest.pop(s) for s in sources]
        out[name] = combine(arrays) if combine else arrays[0]
    return {**out, **rest}


def transformer_groups(names) -> list[tuple[str, ...]]:
    """The diffusers names that fuse into one runtime tensor (q/k/v, a single block's MLP input), in
    the order sanitize_transformer concatenates them, for those groups present in `names`."""
    names = set(names)
    return [s for _, s, combine in _targets(*_layout(names)) if combine is _concat and names & set(s)]


def transformer_to_diffusers(bfl: dict) -> dict:
    """Black Forest Labs-named transformer tensors -> diffusers' names and split layouts (lazy)."""
    hidden = bfl["img_in.weight"].shape[0]
    targets = _targets(
        count_blocks(bfl, "double_blocks"),
        count_blocks(bfl, "single_blocks"),
        "guidance_in.in_layer.weight" in bfl,
    )
    unknown = sorted(set(bfl) - {name for name, _, _ in targets})
    if unknown:
        raise ValueError(f"not FLUX.1 transformer tensors: {', '.join(unknown[:5])}")
    out = {}
    for name, sources, combine in targets:
        arr = _swap_halves([bfl[name]]) if combine is _swap_halves else bfl[name]
        # q, k and v are `hidden` rows each; the single blocks' MLP input takes the rest
        parts = mx.split(arr, [hidden * (j + 1) for j in range(len(sources) - 1)], axis=0)
        out.update(zip(sources, parts))
    return out


def sanitize_t5(weights: dict) -> dict:
    """transformers' T5EncoderModel: the names are the runtime's; `encoder.embed_tokens` is tied to
    `shared`, and a checkpoint may carry either one or both."""
    out = dict(weights)
    embed = out.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in out and embed is not None:
        out["shared.weight"] = embed
    return out


def sanitize_clip(weights: dict) -> dict:
    """transformers' CLIPTextModel, with or without the `text_model.` prefix (transformers 4 writes it,
    transformers 5 save_pretrained drops it)."""
    out = {}
    for k, v in weights.items():
        if k.endswith("position_ids"):
            continue  # a non-persistent buffer older transformers saved
        if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            k = f"text_model.{k}"
        out[k] = v
    return out


def sanitize_vae(weights: dict) -> dict:
    """diffusers' AutoencoderKL names kept (old attention names renamed); 4-D conv weights OIHW -> OHWI."""
    out = {}
    for k, v in weights.items():
        name = _modern_vae_name(k)
        if ".attentions." in name and v.ndim == 4:
            v = v.reshape(
                v.shape[:2]
            )  # a 1x1 conv used as a linear layer (old exports): (O, I, 1, 1) -> (O, I)
        elif v.ndim == 4:
            v = v.transpose(0, 2, 3, 1)
        out[name] = v
    return out


def sanitize_siglip(weights: dict) -> dict:
    """transformers' SiglipVisionModel, with or without the `vision_model.` prefix (transformers 4 writes
    it, transformers 5 save_pretrained drops it); the patch conv OIHW -> OHWI. The pooling head
    (`head.*`) is dropped: Redux reads the last hidden state only, so the runtime does not build it."""
    out = {}
    for k, v in weights.items():
        if k.startswith(("embeddings.", "encoder.", "post_layernorm.", "head.")):
            k = f"vision_model.{k}"
        if k.startswith("vision_model.head.") or k.endswith("position_ids"):
            continue  # the head, and a non-persistent buffer older transformers saved
        out[k] = v.transpose(0, 2, 3, 1) if v.ndim == 4 else v
    return out


_SANITIZE = {
    "transformer": sanitize_transformer,
    "text_encoder": sanitize_clip,
    "text_encoder_2": sanitize_t5,
    "vae": sanitize_vae,
    "image_encoder": sanitize_siglip,
    "image_embedder": dict,  # diffusers' ReduxImageEncoder names are the runtime's
}


def _modern_vae_name(key: str) -> str:
    parts = key.split(".")
    if ".attentions." in key and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
        parts[-2] = _LEGACY_ATTENTION[parts[-2]]
    return ".".join(parts)


def _layout(keys) -> tuple[int, int, bool]:
    # (double blocks, single blocks, guidance embedder), from a diffusers checkpoint's names
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in keys)
    return count_blocks(keys, "transformer_blocks"), count_blocks(keys, "single_transformer_blocks"), guidance


def _swap_halves(arrays: list):
    # diffusers' AdaLayerNormContinuous chunks (scale, shift); BFL's LastLayer chunks (shift, scale).
    a = arrays[0]
    half = a.shape[0] // 2
    return mx.concatenate([a[half:], a[:half]], axis=0)


def _concat(arrays: list):
    return mx.concatenate(arrays, axis=0)


def _leaves(bfl_module: str) -> tuple[tuple[str, str], ...]:
    # (diffusers leaf, BFL leaf): RMSNorms have a scale and no bias, every other module is a Linear.
    if bfl_module.endswith("_norm"):
        return (("weight", "scale"),)
    return (("weight", "weight"), ("bias", "bias"))


def _rules(n_double: int, n_single: int, guidance: bool) -> list[tuple[tuple[str, ...], str]]:
    # (diffusers modules, BFL module) for the whole transformer
    top = {**TOP_MODULES, **(GUIDANCE_MODULES if guidance else {})}
    rules = [((d,), b) for d, b in top.items()]
    for prefix, bfl_prefix, table, n in (
        ("transformer_blocks", "double_blocks", DOUBLE_BLOCK_MODULES, n_double),
        ("single_transformer_blocks", "single_blocks", SINGLE_BLOCK_MODULES, n_single),
    ):
        for i in range(n):
            for d, b in table.items():
                d = d if isinstance(d, tuple) else (d,)
                rules.append((tuple(f"{prefix}.{i}.{m}" for m in d), f"{bfl_prefix}.{i}.{b}"))
    return rules


def _targets(n_double: int, n_single: int, guidance: bool) -> list[tuple[str, tuple[str, ...], object]]:
    # (BFL tensor, its diffusers sources, how to combine them: None takes the one source as it is)
    targets = []
    for modules, bfl in _rules(n_double, n_single, guidance):
        for leaf, bfl_leaf in _leaves(bfl):
            combine = _swap_halves if bfl == _SWAPPED else (_concat if len(modules) > 1 else None)
            targets.append((f"{bfl}.{bfl_leaf}", tuple(f"{m}.{leaf}" for m in modules), combine))
    return targets
