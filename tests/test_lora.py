"""LoRA files in each format against diffusers' load_lora_weights + set_adapters, against each other, on
quantized models, and bad input. The files are built here with random weights (tests/lora_files.py)."""

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mflux import Config, Flux1
from mflux.errors import InvalidArgument, MfluxError
from mflux.folders import open_folder
from mflux.runtime.loader import load_component
from mflux.runtime.lora import LoRALinear, apply_loras, inspect_lora, resolve
from mflux.runtime.quantization import QuantSpec, should_quantize
from tests import lora_files as lf
from tests.fixtures import packed_latents

PROMPT = "Luxury food photograph"
H = W = 64
STEPS = 2
FLOAT32_BOUND = 2  # the runtime's float32 parity bound against diffusers, in 1/255
LATENTS = packed_latents(seed=3, height=H, width=W)
HIDDEN = 64  # the tiny transformer's width

# PEFT modules for file A: q, k and v alone, the single blocks' q and MLP input, every kind of layer.
PEFT_MODULES = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.1.attn.to_v",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.1.attn.to_out.0",
    "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.1.ff_context.net.2",
    "transformer_blocks.1.norm1.linear",
    "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.1.attn.to_v",
    "single_transformer_blocks.1.proj_mlp",
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.1.norm.linear",
    "x_embedder",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "norm_out.linear",
]
CLIP = "text_encoder.text_model.encoder.layers"
# kohya (BFL names) for file B: fused qkv and every other kind of block layer. diffusers 0.42 drops a kohya
# file's top-level layers (img_in, final_layer, ...: converted without their `transformer.` prefix) and its
# CLIP attention layers, so those are checked against PEFT files instead (test_kohya_layouts_equal_peft).
KOHYA_MODULES = {
    "double_blocks.0.img_attn.qkv": 6,
    "double_blocks.1.txt_attn.qkv": 3,
    "double_blocks.0.img_mlp.0": 4,
    "double_blocks.1.txt_mlp.2": 4,
    "double_blocks.0.txt_mod.lin": 4,
    "double_blocks.1.img_attn.proj": 4,
    "single_blocks.0.linear2": 4,
    "single_blocks.1.modulation.lin": 4,
}


def runtime_shapes(folder) -> dict[str, tuple[int, int]]:
    """runtime layer -> (out, in) for the transformer and CLIP."""
    out = {}
    for component in ("transformer", "text_encoder"):
        module = load_component(open_folder(folder), component, mx.float32)
        for name, value in tree_flatten(module.parameters()):
            if name.endswith(".weight") and value.ndim == 2:
                out[name[: -len(".weight")]] = value.shape
    return out


@pytest.fixture(scope="module")
def shapes(tiny_schnell):
    return {"diffusers": lf.transformer_shapes(tiny_schnell), "runtime": runtime_shapes(tiny_schnell)}


@pytest.fixture(scope="module")
def files(tiny_schnell, tmp_path_factory, shapes):
    """File A: PEFT with alpha in diffusers' metadata (and an alpha_pattern); file B: kohya with .alpha keys."""
    folder = tmp_path_factory.mktemp("loras")
    rng = np.random.default_rng(0)
    d = shapes["diffusers"]
    spec = {f"transformer.{m}": lf.pair(rng, 4, d[m][1], d[m][0], 0.3) for m in PEFT_MODULES}
    clip = {
        f"{CLIP}.0.self_attn.q_proj": (64, 64),
        f"{CLIP}.1.self_attn.v_proj": (64, 64),
        f"{CLIP}.1.mlp.fc1": (256, 64),
    }
    spec.update({name: lf.pair(rng, 4, i, o, 2.0) for name, (o, i) in clip.items()})
    meta = lf.peft_metadata(
        transformer=dict(
            r=4,
            lora_alpha=6,
            alpha_pattern={"transformer_blocks.0.attn.to_k": 2},
            target_modules=PEFT_MODULES,
        ),
        text_encoder=dict(r=4, lora_alpha=4, target_modules=[n.split("text_model.")[1] for n in clip]),
    )
    a = lf.save(folder / "a_peft.safetensors", lf.peft(spec), meta)

    r = shapes["runtime"]
    spec = {name: lf.pair(rng, rank, r[name][1], r[name][0], 1.5) for name, rank in KOHYA_MODULES.items()}
    alphas = {
        "double_blocks.0.img_attn.qkv": 3.0,
        "double_blocks.0.img_mlp.0": 8.0,
        "single_blocks.0.linear2": 2.0,
    }
    tensors = lf.kohya(spec, alphas)
    te = {"text_model.encoder.layers.0.mlp.fc1": (256, 64), "text_model.encoder.layers.1.mlp.fc2": (64, 256)}
    te_spec = {name: lf.pair(rng, 4, i, o, 2.0) for name, (o, i) in te.items()}
    tensors.update(lf.kohya(te_spec, {"text_model.encoder.layers.0.mlp.fc1": 2.0}, prefix="lora_te1_"))
    b = lf.save(folder / "b_kohya.safetensors", tensors)
    return {"a": a, "b": b}


def mflux_image(folder, paths=(), scales=None, name=None, **kwargs) -> np.ndarray:
    kwargs |= dict(precision="float32", lora_paths=[str(p) for p in paths], lora_scales=scales)
    flux = Flux1.from_name(name, **kwargs) if name else Flux1.from_path(folder, **kwargs)
    config = Config(num_inference_steps=STEPS, height=H, width=W)
    return np.array(flux.generate_image(0, PROMPT, config, latents=LATENTS).image)


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b.astype(int))


@pytest.fixture(scope="module")
def base_image(tiny_schnell):
    return mflux_image(tiny_schnell)


@pytest.mark.parametrize(
    "loras",
    [[("a", 1.0)], [("b", 1.0)], [("a", 1.0), ("b", 0.5)]],
    ids=["peft", "kohya", "peft+kohya*0.5"],
)
def test_matches_diffusers(loras, files, tiny_schnell, base_image):
    paths = [files[name] for name, _ in loras]
    ref = lf.diffusers_image(
        tiny_schnell,
        [(p, s) for p, (_, s) in zip(paths, loras)],
        PROMPT,
        height=H,
        width=W,
        steps=STEPS,
        latents=LATENTS,
    )
    ours = mflux_image(tiny_schnell, paths, [s for _, s in loras])
    changed = diff(ref, base_image)
    print(
        f"{loras}: max |mflux - diffusers| = {diff(ours, ref).max()}/255, LoRA changed the image by {changed.mean():.1f} on average"
    )
    assert changed.mean() > 5  # the LoRA matters, so agreeing means something
    assert diff(ours, ref).max() <= FLOAT32_BOUND


def test_text_encoder_lora_applies_again_after_freeing(files, tiny_schnell):
    flux = Flux1.from_path(tiny_schnell, precision="float32", lora_paths=[str(files["a"])])
    config = Config(num_inference_steps=1, height=32, width=32)
    first = np.array(flux.generate_image(1, PROMPT, config).image)
    assert isinstance(
        flux.models.modules["text_encoder"].text_model.encoder.layers[0].self_attn.q_proj, LoRALinear
    )
    flux.free_text_encoders()
    again = np.array(flux.generate_image(1, PROMPT, config).image)
    assert np.array_equal(first, again)


# --- formats against each other, on the transformer's and CLIP's outputs ---


def outputs(folder, paths, scales=None) -> list[np.ndarray]:
    """The transformer's output and CLIP's hidden states for fixed inputs, with `paths` applied."""
    f = open_folder(folder)
    modules = {c: load_component(f, c, mx.float32) for c in ("transformer", "text_encoder", "text_encoder_2")}
    apply_loras(modules, [str(p) for p in paths], scales or [1.0] * len(paths))
    rng = np.random.default_rng(1)
    img = mx.array(rng.standard_normal((1, 16, 64)).astype(np.float32))
    txt = mx.array(rng.standard_normal((1, 8, 64)).astype(np.float32))
    img_ids = mx.array(
        np.stack(np.meshgrid(np.zeros(1), np.arange(4), np.arange(4), indexing="ij"), -1).reshape(1, 16, 3)
    )
    txt_ids = mx.zeros((1, 8, 3))
    y = mx.array(rng.standard_normal((1, 64)).astype(np.float32))
    v = modules["transformer"](img, img_ids.astype(mx.float32), txt, txt_ids, mx.array([0.7]), y)
    ids = mx.array(rng.integers(0, 300, (1, 77)))
    hidden, _ = modules["text_encoder"](ids)
    t5 = modules["text_encoder_2"](ids[:, :16])
    return [np.array(v), np.array(hidden), np.array(t5)]


def assert_same_outputs(a: list, b: list, base: list) -> None:
    for x, y, z in zip(a, b, base):
        assert np.abs(x - z).max() > 1e-2  # the LoRA changes this output
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def split_rows(pair, sizes):
    down, up = pair
    bounds = np.cumsum([0, *sizes])
    return [(down, up[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


# BFL top-level layer -> diffusers module; the final modulation's halves are (shift, scale) in BFL's order
# and (scale, shift) in diffusers'.
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def to_diffusers(name: str, pair):
    down, up = pair
    if name == "final_layer.adaLN_modulation.1":
        up = np.concatenate([up[HIDDEN:], up[:HIDDEN]])
    return TOP[name], (down, up)


def test_kohya_layouts_equal_peft(tmp_path, shapes, tiny_schnell):
    """Fused linear1, kohya's split parts (lora_down.N), kohya names of diffusers modules, top-level
    layers, te1/te2 keys: each file equals the PEFT file of the same LoRA."""
    rng = np.random.default_rng(2)
    r = shapes["runtime"]
    mlp = r["single_blocks.0.linear1"][0] - 3 * HIDDEN
    parts = [lf.pair(rng, 2, HIDDEN, n) for n in (HIDDEN, HIDDEN, HIDDEN, mlp)]
    double = [lf.pair(rng, 2, HIDDEN, HIDDEN) for _ in range(3)]
    top = {name: lf.pair(rng, 3, r[name][1], r[name][0], 0.3) for name in TOP}
    clip = {
        f"text_model.encoder.layers.0.self_attn.{p}": lf.pair(rng, 2, 64, 64, 2.0)
        for p in ("q_proj", "k_proj", "out_proj")
    }
    t5 = {"encoder.block.1.layer.0.SelfAttention.v": lf.pair(rng, 2, 64, 64, 2.0)}
    single_names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    double_names = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    blocks = {f"single_transformer_blocks.0.{n}": p for n, p in zip(single_names, parts)}
    blocks |= {f"transformer_blocks.1.{n}": p for n, p in zip(double_names, double)}
    blocks |= dict(to_diffusers(n, p) for n, p in top.items())

    peft = {f"transformer.{n}": p for n, p in blocks.items()}
    peft |= {f"text_encoder.{n}": p for n, p in clip.items()} | {
        f"text_encoder_2.{n}": p for n, p in t5.items()
    }
    text_encoders = lf.kohya(clip, prefix="lora_te1_") | lf.kohya(t5, prefix="lora_te2_")
    # fused, with alpha 4 over the stacked rank 8: the up weights carry the inverse 2x
    down, up = lf.fuse(parts)
    fused = lf.kohya({"single_blocks.0.linear1": (down, up * 2)}, {"single_blocks.0.linear1": 4.0})
    fused |= lf.kohya({"double_blocks.1.txt_attn.qkv": lf.fuse(double)} | top) | text_encoders
    # kohya's split parts scale by alpha over one part's rank (2): alpha 1 halves, so the ups double
    split = lf.kohya_split("single_blocks.0.linear1", [(d, u * 2) for d, u in parts], 1.0)
    split |= lf.kohya_split("double_blocks.1.txt_attn.qkv", double, 2.0)
    split |= lf.kohya(top) | lf.kohya(clip, prefix="lora_te_") | lf.kohya(t5, prefix="lora_te2_")
    diffusers_names = lf.kohya(blocks, prefix="lora_transformer_") | text_encoders

    base = outputs(tiny_schnell, [])
    expected = outputs(tiny_schnell, [lf.save(tmp_path / "peft.safetensors", lf.peft(peft))])
    for name, tensors in [("fused", fused), ("split", split), ("diffusers_names", diffusers_names)]:
        path = lf.save(tmp_path / f"{name}.safetensors", tensors)
        assert inspect_lora(path)["format"] == "kohya"
        assert_same_outputs(outputs(tiny_schnell, [path]), expected, base)


def test_xlabs_and_bfl_equal_peft(tmp_path, shapes, tiny_schnell):
    rng = np.random.default_rng(3)
    r = shapes["runtime"]
    qkv1, qkv2, single_qkv = (lf.pair(rng, 4, HIDDEN, 3 * HIDDEN) for _ in range(3))
    proj1, proj2 = (lf.pair(rng, 4, HIDDEN, HIDDEN) for _ in range(2))
    linear2 = lf.pair(rng, 4, r["single_blocks.1.linear2"][1], HIDDEN)
    xlabs = {
        "double_blocks.0.processor.qkv_lora1": qkv1,
        "double_blocks.0.processor.qkv_lora2": qkv2,
        "double_blocks.1.processor.proj_lora1": proj1,
        "double_blocks.1.processor.proj_lora2": proj2,
        "single_blocks.1.processor.qkv_lora": single_qkv,
        "single_blocks.1.processor.proj_lora": linear2,
    }
    xlabs_tensors = {}
    for name, (down, up) in xlabs.items():
        xlabs_tensors[f"{name}.down.weight"], xlabs_tensors[f"{name}.up.weight"] = down, up
    q, k, v = split_rows(qkv1, [HIDDEN] * 3)
    peft = {"transformer.transformer_blocks.0.attn.to_q": q, "transformer.transformer_blocks.0.attn.to_k": k}
    peft["transformer.transformer_blocks.0.attn.to_v"] = v
    for name, part in zip(["add_q_proj", "add_k_proj", "add_v_proj"], split_rows(qkv2, [HIDDEN] * 3)):
        peft[f"transformer.transformer_blocks.0.attn.{name}"] = part
    peft["transformer.transformer_blocks.1.attn.to_out.0"] = proj1
    peft["transformer.transformer_blocks.1.attn.to_add_out"] = proj2
    for name, part in zip(["to_q", "to_k", "to_v"], split_rows(single_qkv, [HIDDEN] * 3)):
        peft[f"transformer.single_transformer_blocks.1.attn.{name}"] = part
    peft["transformer.single_transformer_blocks.1.proj_out"] = linear2

    # BFL/ComfyUI: a whole linear1 (q, k, v and MLP rows) and the final modulation in BFL's (shift, scale)
    linear1 = lf.pair(rng, 4, HIDDEN, r["single_blocks.0.linear1"][0])
    final = lf.pair(rng, 4, HIDDEN, 2 * HIDDEN)
    bfl = {"diffusion_model.double_blocks.0.img_attn.qkv": qkv1, "single_blocks.0.linear1": linear1}
    bfl["diffusion_model.final_layer.adaLN_modulation.1"] = final
    mlp = r["single_blocks.0.linear1"][0] - 3 * HIDDEN
    peft_bfl = {
        f"transformer.single_transformer_blocks.0.{n}": p
        for n, p in zip(
            ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], split_rows(linear1, [HIDDEN] * 3 + [mlp])
        )
    }
    peft_bfl |= {
        f"transformer.transformer_blocks.0.attn.to_{n}": p
        for n, p in zip("qkv", split_rows(qkv1, [HIDDEN] * 3))
    }
    shift, scale = split_rows(final, [HIDDEN] * 2)
    peft_bfl["transformer.norm_out.linear"] = (final[0], np.concatenate([scale[1], shift[1]]))

    base = outputs(tiny_schnell, [])
    for fmt, tensors, equivalent in [("xlabs", xlabs_tensors, peft), ("bfl", lf.peft(bfl), peft_bfl)]:
        path = lf.save(tmp_path / f"{fmt}.safetensors", tensors)
        ref = lf.save(tmp_path / f"{fmt}_peft.safetensors", lf.peft(equivalent))
        assert inspect_lora(path)["format"] == fmt
        got, want = outputs(tiny_schnell, [path]), outputs(tiny_schnell, [ref])
        assert np.abs(got[0] - base[0]).max() > 1e-2
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_file_dtypes(tmp_path, shapes, tiny_schnell):
    """float64, float16 and bfloat16 files give the float32 file's result (to their own precision)."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(8)
    d = shapes["diffusers"]
    names = ["transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_mlp"]
    spec = {f"transformer.{m}": lf.pair(rng, 4, d[m][1], d[m][0]) for m in names}
    tensors = lf.peft(spec, {f"transformer.{names[0]}": 2.0})
    want = outputs(tiny_schnell, [lf.save(tmp_path / "f32.safetensors", tensors)])[0]
    for dtype, tol in [(torch.float64, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]:
        path = tmp_path / f"{dtype}.safetensors".replace("torch.", "")
        save_file({k: torch.from_numpy(np.array(v)).to(dtype) for k, v in tensors.items()}, path)
        got = outputs(tiny_schnell, [path])[0]
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), dtype


@pytest.mark.parametrize(
    "key, site",
    [
        (
            "transformer.time_text_embed.guidance_embedder.linear_2",
            ("transformer", "guidance_in.out_layer", None),
        ),
        ("lora_unet_guidance_in_in_layer", ("transformer", "guidance_in.in_layer", None)),
        (
            "transformer.single_transformer_blocks.3.proj_mlp",
            ("transformer", "single_blocks.3.linear1", "mlp"),
        ),
        ("lora_transformer_norm_out_linear", ("transformer", "final_layer.adaLN_modulation.1", "swapped")),
        (
            "text_encoder.encoder.layers.2.mlp.fc2",
            ("text_encoder", "text_model.encoder.layers.2.mlp.fc2", None),
        ),
        (
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.k_proj",
            ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj", None),
        ),
        (
            "lora_te2_encoder_block_0_layer_1_DenseReluDense_wi_1",
            ("text_encoder_2", "encoder.block.0.layer.1.DenseReluDense.wi_1", None),
        ),
        ("transformer.transformer_blocks.0.attn.norm_q", None),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", None),
        ("double_blocks.0.processor.qkv_lora3", None),
    ],
)
def test_names_resolve(key, site):
    hit = resolve(key)
    assert (hit and (hit[0].component, hit[0].path, hit[0].part)) == site


# --- quantized models ---


def test_lora_changes_a_4bit_model(files, tiny_schnell, base_image):
    from mflux.convert import quantize

    quantize(str(tiny_schnell), bits=4, name="schnell-q4", dtype="float32")
    float_lora = mflux_image(tiny_schnell, [files["a"]])
    for name, kwargs in [("runtime -q 4", dict(quantize=4)), ("stored 4-bit", dict(name="schnell-q4"))]:
        plain = mflux_image(tiny_schnell, **kwargs)
        with_lora = mflux_image(tiny_schnell, [files["a"]], **kwargs)
        effect, float_effect = diff(with_lora, plain).mean(), diff(float_lora, base_image).mean()
        print(
            f"{name}: LoRA changes the 4-bit image by {effect:.1f}/255 on average (float32: {float_effect:.1f})"
        )
        assert effect > 0.5 * float_effect
        assert diff(with_lora, float_lora).mean() < diff(plain, float_lora).mean()


def fold(model: nn.Module, spec: QuantSpec) -> None:
    """The alternative for runtime -q: merge each LoRA into its float weight, then quantize."""
    for path, layer in list(model.named_modules()):
        if isinstance(layer, LoRALinear):
            merged = nn.Linear(*reversed(layer.base.weight.shape), bias="bias" in layer.base)
            merged.weight = layer.base.weight + (layer.lora_down @ layer.lora_up).T
            if "bias" in layer.base:
                merged.bias = layer.base.bias
            *parents, name = path.split(".")
            node = model
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            if isinstance(node, list):
                node[int(name)] = merged
            else:
                setattr(node, name, merged)
    nn.quantize(
        model,
        class_predicate=lambda p, m: (
            isinstance(m, nn.Linear)
            and should_quantize("transformer", f"{p}.weight", m.weight.shape, spec)
            and {"group_size": spec.group_size, "bits": spec.bits, "mode": spec.mode}
        ),
    )


def test_quantized_separate_path_against_fold(tmp_path, shapes, tiny_schnell):
    """Runtime -q 4: the LoRA beside the quantized layer, or folded into the float weights before
    quantizing. Prints the figures the module docstring quotes: the error of the LoRA's effect on the
    transformer's output against float32, the output error, and the time of a step and of one layer."""
    spec = QuantSpec(4)
    f = open_folder(tiny_schnell)
    d = shapes["diffusers"]
    rng = np.random.default_rng(4)
    modules = [m for m in d if m.startswith(("transformer_blocks", "single_transformer_blocks"))]
    inputs = forward_inputs()
    run = lambda model: np.array(model(*inputs))  # noqa: E731
    results = {}
    for amp in (0.3, 0.03):  # updates of about 50% and 5% of the weights' norm
        lora = {f"transformer.{m}": lf.pair(rng, 16, d[m][1], d[m][0], amp) for m in modules}
        path = lf.save(tmp_path / f"amp{amp}.safetensors", lf.peft(lora))
        folded = load_component(f, "transformer", mx.float32)
        separate = load_component(f, "transformer", mx.float32, spec)
        float_plain, q_plain = run(folded), run(separate)
        apply_loras({"transformer": folded}, [str(path)], [1.0])
        reference = run(folded)
        print(f"LoRA update {relative_update(folded):.3f} of the weights' norm")
        fold(folded, spec)
        apply_loras({"transformer": separate}, [str(path)], [1.0])
        want = reference - float_plain
        for name, model in [("separate", separate), ("fold", folded)]:
            out = run(model)
            results[name, amp] = np.linalg.norm(out - q_plain - want) / np.linalg.norm(want)
            error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
            print(
                f"  {name:8}: LoRA effect error {results[name, amp]:.3f}, output error {error:.3f}, "
                f"step {seconds(lambda m=model: m(*inputs)) * 1000:.0f} ms"
            )
    for amp in (0.3, 0.03):
        assert results["separate", amp] < results["fold", amp]
    assert results["fold", 0.03] > 2 * results["separate", 0.03]

    # one layer at the real model's width: single-stream qkv (3072 -> 9216), 16 tokens, rank 16
    layer = nn.QuantizedLinear.from_linear(nn.Linear(3072, 9216), 64, 4)
    down, up, x = mx.random.normal((3072, 16)), mx.random.normal((16, 9216)), mx.random.normal((1, 16, 3072))
    t_layer, t_path = seconds(lambda: layer(x)), seconds(lambda: (x @ down) @ up)
    print(
        f"3072x9216 4-bit layer {t_layer * 1000:.0f} ms, its rank-16 path {t_path * 1000:.1f} ms ({t_path / t_layer:.1%})"
    )


def relative_update(model: nn.Module) -> float:
    ratios = [
        np.linalg.norm(np.array(m.lora_down @ m.lora_up)) / np.linalg.norm(np.array(m.base.weight))
        for _, m in model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    return float(np.mean(ratios))


def seconds(fn, repeats: int = 3) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def forward_inputs():
    rng = np.random.default_rng(5)
    img = mx.array(rng.standard_normal((1, 256, 64)).astype(np.float32))  # a 256x256 image's tokens
    txt = mx.array(rng.standard_normal((1, 256, 64)).astype(np.float32))
    ids = np.stack(np.meshgrid(np.zeros(1), np.arange(16), np.arange(16), indexing="ij"), -1).reshape(
        1, 256, 3
    )
    y = mx.array(rng.standard_normal((1, 64)).astype(np.float32))
    return img, mx.array(ids.astype(np.float32)), txt, mx.zeros((1, 256, 3)), mx.array([0.7]), y


# --- inspect ---


def test_inspect_lora(files):
    a, b = inspect_lora(files["a"]), inspect_lora(files["b"], tensors=True)
    assert a["kind"] == "lora" and a["format"] == "diffusers" and a["rank"] == "4"
    assert a["alpha"] == "2-6"  # lora_alpha 6, and 2 for one module through alpha_pattern; CLIP 4
    assert a["targets"] == {"transformer": 16, "text_encoder": 3}  # 18 modules; to_q and to_k share a qkv, …
    assert a["parameters"] == sum(4 * (i + o) for o, i in _pairs(files["a"]))
    assert b["format"] == "kohya" and b["rank"] == "3-6" and b["alpha"] == "2-8"
    assert b["targets"] == {"transformer": len(KOHYA_MODULES), "text_encoder": 2}
    assert sum(len(c["tensors"]) for c in b["components"].values()) == 2 * (len(KOHYA_MODULES) + 2) + 4
    assert list(b["components"]) == ["transformer", "text_encoder"]
    assert b["unmatched"] == 0

    from mflux.inspector import format_inspect, inspect

    report = inspect(str(files["b"]))
    assert report["format"] == "kohya"
    text = format_inspect(report)
    assert "kohya" in text and "transformer 8" in text


def _pairs(path):
    from mflux.runtime.weights import SafetensorsFile

    sf = SafetensorsFile(path)
    for k, (_, shape, _) in sf.tensors.items():
        if k.endswith("lora_B.weight"):
            yield shape[0], sf.tensors[k.replace("lora_B", "lora_A")][1][1]


# --- bad input ---


def apply(folder, paths, scales=None):
    modules = {"transformer": load_component(open_folder(folder), "transformer", mx.float32)}
    apply_loras(modules, [str(p) for p in paths], scales or [1.0] * len(paths))
    return modules


def test_sdxl_lora_is_refused_naming_its_keys(tmp_path, tiny_schnell):
    rng = np.random.default_rng(6)
    sdxl = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": lf.pair(rng, 4, 64, 64),
        "mid_block.attentions.0.proj_in": lf.pair(rng, 4, 64, 64),
    }
    tensors = lf.kohya(sdxl, {k: 4.0 for k in sdxl})
    tensors |= lf.kohya(
        {"text_model.encoder.layers.0.self_attn.q_proj": lf.pair(rng, 4, 64, 64)}, prefix="lora_te1_"
    )
    path = lf.save(tmp_path / "sdxl.safetensors", tensors)
    with pytest.raises(
        MfluxError,
        match=r"6 of 8 tensors match no layer.*lora_unet_down_blocks_1_attentions_0.*another model",
    ):
        apply(tiny_schnell, [path])


def test_keys_matching_nothing_are_refused(tmp_path, tiny_schnell):
    path = lf.save(tmp_path / "junk.safetensors", {"model.layers.0.mlp.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(MfluxError, match=r"1 of 1 tensors match no layer.*model\.layers\.0\.mlp\.weight"):
        apply(tiny_schnell, [path])


def test_partial_match_warns_with_counts(tmp_path, tiny_schnell):
    rng = np.random.default_rng(7)
    spec = {
        "transformer.transformer_blocks.0.attn.to_q": lf.pair(rng, 4, 64, 64),
        "transformer.transformer_blocks.5.attn.to_q": lf.pair(rng, 4, 64, 64),  # the tiny model has 2 blocks
        "transformer.single_transformer_blocks.9.proj_out": lf.pair(rng, 4, 320, 64),
    }
    tensors = lf.peft(spec) | {
        "transformer.transformer_blocks.0.attn.to_q.dora_scale": np.ones((1, 64), np.float32)
    }
    path = lf.save(tmp_path / "partial.safetensors", tensors)
    with pytest.warns(UserWarning, match=r"5 of 7 LoRA tensors match no layer.*\(1 LoRA layers apply\)"):
        modules = apply(tiny_schnell, [path])
    assert isinstance(modules["transformer"].double_blocks[0].img_attn.qkv, LoRALinear)


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {"transformer.transformer_blocks.0.attn.to_q": (np.zeros((4, 32)), np.zeros((64, 4)))},
            r"transformer_blocks\.0\.attn\.to_q targets transformer layer double_blocks\.0\.img_attn\.qkv, whose input width is 64, but its down weight is \(4, 32\)",
        ),
        (
            {"transformer.transformer_blocks.0.attn.to_q": (np.zeros((4, 64)), np.zeros((192, 4)))},
            r"to_q targets .*qkv, 64 rows \(0:64 of 192\), but its up weight is \(192, 4\)",
        ),
        (
            {"transformer.x_embedder": (np.zeros((4, 64)), np.zeros((64, 3)))},
            r"x_embedder\.lora_A\.weight \(4, 64\) and .*lora_B\.weight \(64, 3\) are not a LoRA pair",
        ),
    ],
    ids=["input width", "rows", "rank"],
)
def test_shape_and_rank_mismatches_are_refused(tensors, message, tmp_path, tiny_schnell):
    spec = {k: (d.astype(np.float32), u.astype(np.float32)) for k, (d, u) in tensors.items()}
    path = lf.save(tmp_path / "bad.safetensors", lf.peft(spec))
    with pytest.raises(MfluxError, match=message):
        apply(tiny_schnell, [path])


def test_half_a_pair_is_refused(tmp_path, tiny_schnell):
    path = lf.save(
        tmp_path / "half.safetensors", {"lora_unet_img_in.lora_down.weight": np.zeros((4, 64), np.float32)}
    )
    with pytest.raises(MfluxError, match=r"lora_unet_img_in has no up \(lora_B\) weight"):
        apply(tiny_schnell, [path])


def test_pickle_lora_is_refused_unread(tmp_path, tiny_schnell):
    for suffix in (".ckpt", ".pt", ".bin"):
        path = tmp_path / f"lora{suffix}"
        path.write_bytes(b"not read")
        with pytest.raises(MfluxError, match="pickle"):
            apply(tiny_schnell, [path])
        with pytest.raises(MfluxError, match="pickle"):
            inspect_lora(path)


def test_scales_must_match_paths(files, tiny_schnell):
    with pytest.raises(InvalidArgument, match="2 LoRA paths but 1 scales"):
        apply(tiny_schnell, [files["a"], files["b"]], [1.0])


# --- the CLI ---


def test_cli_run_with_two_loras(files, tiny_schnell, tmp_path):
    from click.testing import CliRunner

    from mflux.cli import cli

    out = tmp_path / "cli.png"
    args = ["run", "--path", str(tiny_schnell), "--prompt", PROMPT, "--height", "32", "--width", "32"]
    args += ["--steps", "1", "--seed", "7", "--precision", "float32", "--output", str(out)]
    args += ["--lora-paths", str(files["a"]), str(files["b"]), "--lora-scales", "1.0", "0.5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    flux = Flux1.from_path(
        tiny_schnell,
        precision="float32",
        lora_paths=[str(files["a"]), str(files["b"])],
        lora_scales=[1.0, 0.5],
    )
    api = flux.generate_image(7, PROMPT, Config(num_inference_steps=1, height=32, width=32))
    from PIL import Image

    assert np.array_equal(np.array(Image.open(out).convert("RGB")), np.array(api.image))
    assert api.metadata["lora_scales"] == [1.0, 0.5]
