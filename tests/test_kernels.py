"""runtime.kernels: the glue kernels' portable path here, the kernels themselves where MLX has CUDA.

The CUDA tests need MLX's CUDA backend: they are skipped on this CPU (and in CI) and run on the lent GPU
(`bench/gpu.sh aa`, whose output is in bench/results/h200-round10/).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mflux.runtime import kernels, layers, qmatmul
from mflux.runtime.device import backend

cuda = pytest.mark.skipif(backend() != "cuda", reason="needs MLX's CUDA backend")

H, D = 4, kernels.HEAD_DIM


def _streams(dtype, txt=6, img=10, extra=0):
    mx.random.seed(0)
    rand = lambda *s: mx.random.normal(s).astype(dtype)  # noqa: E731
    ids = mx.concatenate([mx.zeros((1, txt, 3)), mx.random.randint(0, 32, (1, img, 3)).astype(mx.float32)], 1)
    pe = layers.rope(ids, (16, 56, 56))
    streams = [(rand(1, n, 3 * H * D + extra) * 2, 1 + rand(D) * 0.1, 1 + rand(D) * 0.1) for n in (txt, img)]
    return streams, pe


def test_the_joint_sequence_is_each_stream_with_its_own_part_of_the_tables():
    streams, pe = _streams(mx.float32)
    q, k, v = layers.qk_rope_ops(streams, H, pe)
    txt = layers.qk_rope_ops(streams[:1], H, tuple(t[:, :6] for t in pe))
    img = layers.qk_rope_ops(streams[1:], H, tuple(t[:, 6:] for t in pe))
    for joint, a, b in zip((q, k, v), txt, img):
        assert joint.shape == (1, 16, H, D)
        np.testing.assert_array_equal(np.array(joint), np.concatenate([np.array(a), np.array(b)], axis=1))


def test_off_cuda_the_blocks_take_mlx_ops(monkeypatch):
    if backend() == "cuda":
        pytest.skip("this backend runs the kernels")
    streams, pe = _streams(mx.float32)
    calls = []
    monkeypatch.setattr(kernels, "_qk_launch", lambda *a: calls.append(a))
    monkeypatch.setattr(kernels, "_gelu_launch", lambda *a: calls.append(a))
    q, k, v = kernels.qk_rope(streams, H, pe, layers.qk_rope_ops)
    out = kernels.gelu_concat(
        q.reshape(1, 16, -1), mx.zeros((1, 16, 3 * H * D + 64)), 3 * H * D, layers._concat_act
    )
    mx.eval(q, k, v, out)
    assert calls == [] and kernels._cubin is None and kernels.status() == f"off on {backend()}"
    # and the MLPs keep MLX's own GELU there
    x = mx.random.normal((4, 64)).astype(mx.bfloat16)
    assert mx.array_equal(layers.mlp_act(x), nn.gelu_approx(x)).item()


def test_the_float32_gelu_is_pytorchs_tanh_gelu():
    torch = pytest.importorskip("torch")
    x = (mx.random.normal((4096,)) * 3).astype(mx.bfloat16)
    ours = np.array(layers.gelu_f32(x).astype(mx.float32))
    t = torch.from_numpy(np.array(x.astype(mx.float32))).to(torch.bfloat16)
    theirs = torch.nn.functional.gelu(t, approximate="tanh").float().numpy()
    # both compute in float32 and round once; their tanh differs in the last bits, and PyTorch's (CPU)
    # saturates to -1 sooner: below about x = -5 it gives -0.0 where this gives -1.5e-7
    assert (ours != theirs).mean() < 0.01
    np.testing.assert_allclose(ours, theirs, rtol=2**-7, atol=1e-6)


# ---------------------------------------------------------------- on CUDA


def _bf16_ulps(a: mx.array, b: mx.array) -> np.ndarray:
    a, b = (np.array(x.astype(mx.float32)) for x in (a, b))
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30) * 2**7  # bf16 has 8 significant bits


@cuda
@pytest.mark.parametrize("two", [False, True])
def test_the_qk_kernel_gives_the_ops_values(two):
    streams, pe = _streams(mx.bfloat16, extra=0 if two else 8 * D)
    streams = streams if two else [(mx.concatenate([s[0] for s in streams], 1), *streams[1][1:])]
    ours = kernels.qk_rope(streams, H, pe, layers.qk_rope_ops)
    kernels.USE["cuda"] = False
    try:
        ref = layers.qk_rope_ops(streams, H, pe)
    finally:
        kernels.USE["cuda"] = True
    np.testing.assert_array_equal(np.array(ours[2].astype(mx.float32)), np.array(ref[2].astype(mx.float32)))
    for a, b in zip(ours[:2], ref[:2]):
        assert a.shape == b.shape
        ulps = _bf16_ulps(a, b)
        # the mean square is summed in another order than mx.fast.rms_norm's: a rounding may flip
        assert (ulps > 0).mean() < 0.01 and ulps.max() <= 2


@cuda
def test_the_gelu_concat_kernel_gives_the_float32_ops_values():
    mx.random.seed(1)
    attn = mx.random.normal((1, 16, 3 * 64)).astype(mx.bfloat16)
    h = (mx.random.normal((1, 16, 5 * 64)) * 3).astype(mx.bfloat16)
    ours = kernels.gelu_concat(attn, h, 2 * 64, layers._concat_act)
    ref = mx.concatenate([attn, layers.gelu_f32(h[..., 2 * 64 :])], axis=-1)
    assert ours.shape == ref.shape == (1, 16, 6 * 64)
    assert mx.array_equal(ours[..., : 3 * 64], attn).item()
    assert _bf16_ulps(ours, ref).max() <= 1


@cuda
def test_the_kernels_gradients_are_the_ops_gradients():
    streams, pe = _streams(mx.bfloat16)
    src = [s[0] for s in streams]
    # linear in the outputs, so that both ways get the same cotangents
    c = [mx.random.normal((1, 16, H, D)) for _ in range(3)]

    def loss(use, *src):
        kernels.USE["cuda"] = use
        out = kernels.qk_rope([(x, *s[1:]) for x, s in zip(src, streams)], H, pe, layers.qk_rope_ops)
        return sum((o.astype(mx.float32) * w).sum() for o, w in zip(out, c))

    try:
        ours = mx.grad(lambda *s: loss(True, *s), argnums=(0, 1))(*src)
        ref = mx.grad(lambda *s: loss(False, *s), argnums=(0, 1))(*src)
    finally:
        kernels.USE["cuda"] = True
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))


@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_the_dequantize_kernel_is_mlx_dequantize_bit_for_bit(bits):
    for dtype in (mx.bfloat16, mx.float16):
        for rows, k in ((1, 128), (3, 256), (96, 1024)):
            w = mx.random.normal((rows, k), key=mx.random.key(rows)).astype(dtype) * 3
            for group in (32, 64, 128):
                q, scales, biases = mx.quantize(w, group, bits)
                assert kernels.dequantize_takes(q, scales, biases, group, bits)
                ours = kernels.dequantize(q, scales, biases, group, bits)
                theirs = mx.dequantize(q, scales, biases, group, bits)
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == w.shape
                assert mx.array_equal(ours, theirs).item(), (dtype, rows, k, group)


def _quantized_layer(bits=4, group=64, mode="affine"):
    layer = nn.QuantizedLinear.from_linear(nn.Linear(256, 32), group_size=group, bits=bits, mode=mode)
    for name in ("scales", "biases", "bias"):
        if name in layer and layer[name].dtype == mx.float32:
            layer[name] = layer[name].astype(mx.bfloat16)
    return qmatmul.choose_matmul(nn.Sequential(layer), 1, "kernel").layers[0]


def test_the_dequantize_kernel_takes_affine_4_and_8_bits_into_16_bit_scales(monkeypatch):
    monkeypatch.setitem(kernels.USE, backend(), True)
    monkeypatch.setattr(kernels, "_load_cubin", lambda: b"code")
    for bits in (4, 8):
        layer = _quantized_layer(bits)
        assert kernels.dequantize_takes(layer["weight"], layer["scales"], layer["biases"], 64, bits)
        s32 = layer["scales"].astype(mx.float32)
        assert not kernels.dequantize_takes(layer["weight"], s32, layer["biases"], 64, bits)
        assert not kernels.dequantize_takes(layer["weight"], layer["scales"], None, 64, bits)
    for bits, group, mode in ((6, 64, "affine"), (3, 64, "affine"), (4, 32, "mxfp4"), (8, 32, "mxfp8")):
        layer = _quantized_layer(bits, group, mode)
        assert not kernels.dequantize_takes(
            layer["weight"], layer["scales"], layer.get("biases"), group, bits
        ), (bits, mode)
    with kernels.off():
        layer = _quantized_layer(4)
        assert not kernels.dequantize_takes(layer["weight"], layer["scales"], layer["biases"], 64, 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_layer_set_to_the_kernel_gives_mlx_dequantize_values_where_it_does_not_run(monkeypatch, bits):
    """Off CUDA, and inside `kernels.off()` (the trainer's compiled step), a layer whose choice is
    "kernel" takes the fused graph (8 bits) or mx.dequantize: the same product as the backend's own."""
    calls = []
    monkeypatch.setattr(kernels, "dequantize", lambda *a: calls.append(a))
    layer = _quantized_layer(bits)
    x = mx.random.normal((1, 5, 256)).astype(mx.bfloat16)
    w = mx.dequantize(layer["weight"], layer["scales"], layer["biases"], 64, bits)
    expected = mx.addmm(layer["bias"], x, w.T)
    with kernels.off():
        assert mx.array_equal(layer(x), expected).item()
    if backend() != "cuda":
        assert mx.array_equal(layer(x), expected).item()
    assert calls == []


def test_off_keeps_the_kernels_out_on_its_thread_only(monkeypatch):
    import threading

    monkeypatch.setitem(kernels.USE, backend(), True)
    monkeypatch.setattr(kernels, "_load_cubin", lambda: b"code")
    seen = []
    with kernels.off():
        assert not kernels.enabled()
        other = threading.Thread(target=lambda: seen.append(kernels.enabled()))
        other.start()
        other.join()
    assert seen == [True] and kernels.enabled()
