"""Quantized layers that dequantize just before a float matmul (mflux.runtime.qmatmul): the same images
as MLX's quantized matmul, the weights still quantized, and the per-backend choice."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mflux.folders import open_folder
from mflux.runtime import engine, qmatmul, sampler
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
# 7 (q4) of 255, mean 0.86, since the dequantized weight is rounded to bfloat16 before the matmul. That
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


def test_the_backend_decides_what_the_loader_builds(tiny_schnell, monkeypatch):
    mf = open_folder(tiny_schnell)
    assert qmatmul.backend() == "cpu"
    plain = load_component(mf, "text_encoder", mx.float32, QuantSpec(8))
    # CPU and Metal keep MLX's own layer: nothing changes where the choice is None
    assert {type(m) for m in _quantized_layers({"c": plain})} == {nn.QuantizedLinear}
    monkeypatch.setitem(qmatmul.MIN_ROWS, "cpu", 32)
    chosen = load_component(mf, "text_encoder", mx.float32, QuantSpec(8))
    layers = _quantized_layers({"c": chosen})
    assert layers and all(type(m) is qmatmul.QuantizedLinear and m.min_rows == 32 for m in layers)
    assert qmatmul.MIN_ROWS["metal"] is None  # no Mac measured: Metal keeps quantized_matmul
