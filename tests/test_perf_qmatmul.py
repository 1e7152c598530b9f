"""Quantized layers that dequantize just before a float matmul (mflux.runtime.cuda.qmatmul): the same
images as MLX's quantized matmul, the weights still quantized, and the CUDA tuning's choice
(`Tuning.dequantize_min_rows`, `Tuning.fused_dequantize`), which the portable runtime never takes."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mflux.folders import open_folder
from mflux.runtime import device, engine, sampler
from mflux.runtime.cuda import qmatmul
from mflux.runtime.folder import COMPONENTS
from mflux.runtime.loader import load_component
from mflux.runtime.quantization import QuantSpec
from mflux.runtime.tokenizers import clip_ids, load_tokenizers, t5_ids
from tests.fixtures import packed_latents

SIZE, STEPS, PROMPT = 64, 2, "a photo of a cat"


def _models(folder, dtype, bits):
    mf = open_folder(folder)
    return {c: load_component(mf, c, dtype, QuantSpec(bits)) for c in COMPONENTS}


def _image(folder, models, dtype) -> np.ndarray:
    clip_tok, t5_tok = load_tokenizers(folder)
    txt, pooled = engine.encode_prompt(
        models["text_encoder"],
        models["text_encoder_2"],
        clip_ids(clip_tok, [PROMPT]),
        t5_ids(t5_tok, [PROMPT], 256),
        dtype,
    )
    sigmas = sampler.sigmas(STEPS, (SIZE // 16) ** 2, shift=False)
    noise = mx.array(packed_latents(3, SIZE, SIZE)).astype(dtype)
    mods = engine.modulations(models["transformer"], pooled, sigmas, None)
    for x in engine.denoise(models["transformer"], txt, noise, sigmas, SIZE, SIZE, mods):
        mx.eval(x)
    return engine.decode(models["vae"], x, SIZE, SIZE)[0]


def _quantized_layers(models) -> list:
    return [
        m for model in models.values() for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)
    ]


# Measured on this CPU (64 px, 2 steps): float32 q8 and q4 identical images. bfloat16: max 8 (q8) and
# 7 (q4) of 255, mean 0.86 (0.88 with the bias in the matmul's epilogue, `mx.addmm`), since the dequantized weight is rounded to bfloat16 before the matmul. That
# is the size of bfloat16's own error: the old path's bfloat16 image is max 6-7, mean 0.74-0.77 from
# its float32 image.
@pytest.mark.parametrize("dtype, bits, bound", [(mx.float32, 8, (0, 0)), (mx.bfloat16, 4, (10, 1.5))])
def test_dequantize_path_images_match_quantized_matmul(tiny_schnell, dtype, bits, bound):
    models = _models(tiny_schnell, dtype, bits)
    old = _image(tiny_schnell, models, dtype)
    assert old.std() > 10  # not a flat image, so the comparison means something
    layers = _quantized_layers(models)
    assert len(layers) > 10  # transformer, T5 and CLIP layers all take part
    for model in models.values():
        qmatmul.choose_matmul(model, 1)  # every call dequantizes
    assert all(isinstance(m, qmatmul.QuantizedLinear) for m in _quantized_layers(models))
    new = _image(tiny_schnell, models, dtype)
    diff = np.abs(new.astype(int) - old)
    print(
        f"{dtype} q{bits}: dequantize-then-matmul vs quantized_matmul, |pixel diff| max {diff.max()} mean {diff.mean():.3f}"
    )
    assert diff.max() <= bound[0] and diff.mean() <= bound[1]


def test_weights_stay_quantized_and_small_inputs_keep_quantized_matmul(monkeypatch):
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 64, bias=False))
    nn.quantize(model, 64, 8)
    before = {k: (v.dtype, v.shape) for k, v in tree_flatten(model.parameters())}
    x = mx.random.normal((1, 40, 128))
    ref = model(x)
    qmatmul.choose_matmul(model, 32)
    assert {k: (v.dtype, v.shape) for k, v in tree_flatten(model.parameters())} == before
    assert before["layers.0.weight"][0] == mx.uint32  # still packed integers, no float copy kept

    calls = []
    real = mx.dequantize
    monkeypatch.setattr(qmatmul.mx, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_allclose(np.array(model(x)), np.array(ref), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # 40 rows >= 32: both layers dequantized
    model(x[:, :31])
    assert len(calls) == 2  # 31 rows: quantized_matmul
    qmatmul.choose_matmul(model, None)
    model(x)
    assert len(calls) == 2


def test_the_tuning_decides_what_the_loader_builds(tiny_schnell, cuda_paths, monkeypatch):
    mf = open_folder(tiny_schnell)
    plain = load_component(mf, "text_encoder", mx.float32, QuantSpec(8))
    # nothing changes where the tuning's choice is None
    assert {type(m) for m in _quantized_layers({"c": plain})} == {nn.QuantizedLinear}
    with cuda_paths.tuned(dequantize_min_rows=32):
        chosen = load_component(mf, "text_encoder", mx.float32, QuantSpec(8))
        layers = _quantized_layers({"c": chosen})
        assert layers and all(type(m) is qmatmul.QuantizedLinear and m.min_rows == 32 for m in layers)
        # off CUDA (CPU, Metal: no Mac measured) the tuning is never asked: MLX's quantized_matmul
        monkeypatch.setattr(device, "_cuda", False)
        portable = load_component(mf, "text_encoder", mx.float32, QuantSpec(8))
    assert {type(m) for m in _quantized_layers({"c": portable})} == {nn.QuantizedLinear}


def _qlora_step_peak(min_rows: int | None) -> tuple[float, float, int]:
    """(loss after two steps, MLX's peak over what was held before them, the base's float weight bytes)
    for a LoRA trained on a 4-bit base whose layers dequantize from `min_rows` rows (None: never)."""
    import mlx.optimizers as optim

    from mflux.runtime.model import Flux, FluxParams
    from mflux.train import lora
    from mflux.train.trainer import make_step

    mx.random.seed(0)
    params = FluxParams(64, 256, 2, 4, 8, (16, 56, 56), 256, 64, True)  # 128-wide heads, as FLUX.1's
    flux = Flux(params)
    flux.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05 if p.ndim > 1 else p, flux.parameters()))
    float_bytes = sum(m.weight.nbytes for _, m in flux.named_modules() if isinstance(m, nn.Linear))
    nn.quantize(
        flux, 64, 4, class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[1] % 64 == 0
    )
    qmatmul.choose_matmul(flux, min_rows)
    lora.attach(flux, lora.target_modules(flux.params, lora.target_leaves(None)), 8, 8.0)
    side = 128
    cache = {
        "latents": mx.random.normal((1, (side // 16) ** 2, 64)),
        "txt": mx.random.normal((1, 32, 256)),
        "pooled": mx.random.normal((1, 64)),
        "caption": mx.array([0], dtype=mx.int32),
    }
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(flux.trainable_parameters())
    scheduler = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
    step = make_step(flux, optimizer, cache, scheduler, side, 1, checkpoint=True)
    key = mx.random.key(0)
    mx.eval(cache, flux.state, optimizer.state)
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    for _ in range(2):
        loss, key = step(key, mx.array([0]))
        mx.eval(flux.state, optimizer.state, loss, key)
    return loss.item(), mx.get_peak_memory() - held, float_bytes


# Measured on this CPU: the dequantizing base's step peaked 21 MB over the quantized_matmul one's
# (about one block's float weights at a time, 30% of the 71.5 MB float base), against 46 MB (65%)
# before each float weight was made to depend on its layer's input: mx.compile then merged the
# forward's dequantize with the checkpoint's recomputed one, keeping the float weights from the
# forward pass to the backward.
def test_a_dequantizing_base_trains_without_holding_every_float_weight():
    loss_qmm, peak_qmm, float_bytes = _qlora_step_peak(None)
    loss_deq, peak_deq, _ = _qlora_step_peak(1)
    print(f"QLoRA step peak over held: qmm {peak_qmm / 1e6:.1f} MB, dequantize {peak_deq / 1e6:.1f} MB")
    assert loss_deq == pytest.approx(loss_qmm, rel=1e-5)  # the same training at float32
    assert peak_deq - peak_qmm < 0.4 * float_bytes


@pytest.mark.parametrize("compiled", [True, False])
def test_the_fused_dequantize_is_mlx_dequantize_bit_for_bit(compiled):
    """qmatmul.dequantize_fused, compiled (its kernel) and not (a fresh process while the warm-up
    builds), gives mx.dequantize's bits at every float dtype, group size and a row count of 1 and 3."""
    if not compiled:
        mx.disable_compile()
    try:
        for dtype in (mx.bfloat16, mx.float16, mx.float32):
            for rows, k in ((1, 128), (3, 256), (96, 1024)):
                w = mx.random.normal((rows, k), key=mx.random.key(rows)).astype(dtype)
                for group in (32, 64, 128):
                    q, scales, biases = mx.quantize(w, group, 8)
                    ours = qmatmul.dequantize_fused(q, scales, biases, group)
                    theirs = mx.dequantize(q, scales, biases, group, 8)
                    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == w.shape
                    assert mx.array_equal(ours, theirs).item(), (dtype, rows, k, group)
    finally:
        mx.enable_compile()


def test_fused_dequantize_images_are_the_mx_dequantize_images(tiny_schnell):
    """The whole pipeline at 8 bits, every quantized layer dequantizing with the fused graph against
    mx.dequantize: the same pixels (bfloat16); 4-bit layers are left to mx.dequantize."""
    models = _models(tiny_schnell, mx.bfloat16, 8)
    images = {}
    for how in ("mlx", "fused"):
        for model in models.values():
            qmatmul.choose_matmul(model, 1, fused=how == "fused")
        images[how] = _image(tiny_schnell, models, mx.bfloat16)
    fused = [m for m in _quantized_layers(models) if qmatmul.fused_applies(m, mx.bfloat16)]
    assert len(fused) > 10 and images["mlx"].std() > 10
    np.testing.assert_array_equal(images["fused"], images["mlx"])
    q4 = nn.QuantizedLinear.from_linear(nn.Linear(128, 64), group_size=64, bits=4)
    assert not qmatmul.fused_applies(q4, mx.float32)


def test_the_text_encoders_keep_mlx_dequantize_where_the_transformer_takes_the_fused_graph(
    tiny_schnell, cuda_paths
):
    """The text encoders run before the warm-up's children can have built a compiled graph, so their
    quantized layers take MLX's prebuilt dequantize, while the transformer's take the tuning's choice."""
    with cuda_paths.tuned(dequantize_min_rows=1, fused_dequantize=True):
        models = _models(tiny_schnell, mx.bfloat16, 8)
    for component, fused in (("transformer", True), ("text_encoder", False), ("text_encoder_2", False)):
        layers = _quantized_layers({component: models[component]})
        assert layers and all(type(m) is qmatmul.QuantizedLinear for m in layers), component
        assert {m.fused for m in layers} == {fused}, component
