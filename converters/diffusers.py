"""diffusers / Hugging Face names -> the runtime's names, as plans.

The transformer keeps Black Forest Labs' names and fused layouts, so its plan is the inverse of
diffusers' `convert_flux_transformer_checkpoint_to_diffusers`: q/k/v (and the single blocks' MLP input)
are concatenated back into one matrix, norms' `weight` becomes `scale`, and the final modulation's two
halves go back from (scale, shift) to (shift, scale). The other components keep Hugging Face's names;
their plans live beside their modules.
"""

from mflux.converters.plan import Plan, Target, concat

from mflux.runtime.model import count_blocks

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


def _swap_halves(arrays: list):
    # diffusers' AdaLayerNormContinuous chunks (scale, shift); BFL's LastLayer chunks (shift, scale).
    import mlx.core as mx

    a = arrays[0]
    half = a.shape[0] // 2
    return mx.concatenate([a[half:], a[:half]], axis=0)


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


def _targets(n_double: int, n_single: int, guidance: bool) -> list[Target]:
    targets = []
    for modules, bfl in _rules(n_double, n_single, guidance):
        for leaf, bfl_leaf in _leaves(bfl):
            combine = _swap_halves if bfl == _SWAPPED else (concat(0) if len(modules) > 1 else None)
            targets.append(Target(f"{bfl}.{bfl_leaf}", tuple(f"{m}.{leaf}" for m in modules), combine))
    return targets


def transformer_plan(source) -> Plan:
    """Plan mapping a diffusers FluxTransformer2DModel checkpoint onto Black Forest Labs' names.

    The block counts and the guidance embedder are read from the source's names; every tensor the
    model needs is named, so `Plan.check` reports both missing and unmapped tensors.
    """
    keys = list(source.keys())
    n_double = count_blocks(keys, "transformer_blocks")
    n_single = count_blocks(keys, "single_transformer_blocks")
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in keys)
    return Plan(_targets(n_double, n_single, guidance))


def transformer_to_diffusers(bfl: dict) -> dict:
    """Black Forest Labs-named transformer tensors -> diffusers' names and split layouts (mx arrays)."""
    import mlx.core as mx

    hidden = bfl["img_in.weight"].shape[0]
    guidance = "guidance_in.in_layer.weight" in bfl
    targets = _targets(count_blocks(bfl, "double_blocks"), count_blocks(bfl, "single_blocks"), guidance)
    unknown = sorted(set(bfl) - {t.name for t in targets})
    if unknown:
        raise ValueError(f"not FLUX.1 transformer tensors: {', '.join(unknown[:5])}")
    out = {}
    for t in targets:
        arr = _swap_halves([bfl[t.name]]) if t.combine is _swap_halves else bfl[t.name]
        # q, k and v are `hidden` rows each; the single blocks' MLP input takes the rest
        parts = mx.split(arr, [hidden * (j + 1) for j in range(len(t.sources) - 1)], axis=0)
        out.update(zip(t.sources, parts))
    return out


def component_plan(component: str, source) -> Plan:
    """The plan of one diffusers pipeline component folder."""
    if component == "transformer":
        return transformer_plan(source)
    if component == "vae":
        from mflux.runtime import autoencoder

        return autoencoder.plan(source)
    if component == "text_encoder":
        from mflux.runtime import clip

        return clip.plan(source)
    if component == "text_encoder_2":
        from mflux.runtime import t5

        return t5.plan(source)
    raise ValueError(f"unknown component {component!r} (transformer, vae, text_encoder, text_encoder_2)")
