"""mflux.runtime.cuda.kernels: the glue kernels' portable path here, the kernels themselves where MLX
has CUDA.

The CUDA tests need MLX's CUDA backend: they are skipped on a CPU (and in CI) and run on a GPU with
`python -m pytest tests/test_kernels.py`.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mflux.runtime import cuda, layers
from mflux.runtime.cuda import kernels
from mflux.runtime.device import backend

on_cuda = pytest.mark.skipif(backend() != "cuda", reason="needs MLX's CUDA backend")

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


def test_off_cuda_the_blocks_take_mlx_ops(cuda_paths, monkeypatch):
    """Tuned off, or where the kernels can't be built (here: no CUDA driver), the blocks' calls through
    the CUDA tuning take MLX's ops, and `status()` says why."""
    if backend() == "cuda":
        pytest.skip("this backend runs the kernels")
    monkeypatch.setattr(kernels, "_why_not", None)  # this test's own try at the build
    streams, pe = _streams(mx.bfloat16)
    calls = []
    monkeypatch.setattr(kernels, "_qk_launch", lambda *a: calls.append(a))
    monkeypatch.setattr(kernels, "_gelu_launch", lambda *a: calls.append(a))
    h = mx.random.normal((1, 16, 3 * H * D + 64)).astype(mx.bfloat16)
    x = mx.random.normal((4, 64)).astype(mx.bfloat16)
    ref = layers.qk_rope_ops(streams, H, pe)
    for tuning in (False, True):  # MLX's ops as the tuning asks, then where the build fails
        with cuda_paths.tuned(kernels=tuning):
            q, k, v = layers.qk_rope(streams, H, pe)
            out = layers.gelu_concat(q.reshape(1, 16, -1), h, 3 * H * D)
            mx.eval(q, k, v, out)
            for a, b in zip((q, k, v), ref):
                assert mx.array_equal(a, b).item()
            assert mx.array_equal(out, layers._concat_act(q.reshape(1, 16, -1), h[..., 3 * H * D :])).item()
            # and the MLPs keep MLX's own GELU there
            assert mx.array_equal(layers.mlp_act(x), nn.gelu_approx(x)).item()
    assert calls == [] and kernels._cubin is None
    assert kernels.status() == "off (tuned off)"
    with cuda_paths.tuned(kernels=True):
        assert kernels.status().startswith("off: ")  # why the build failed here
    assert cuda.status() == f"off: MLX runs on {backend()}"


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


@on_cuda
@pytest.mark.parametrize("two", [False, True])
def test_the_qk_kernel_gives_the_ops_values(two):
    streams, pe = _streams(mx.bfloat16, extra=0 if two else 8 * D)
    streams = streams if two else [(mx.concatenate([s[0] for s in streams], 1), *streams[1][1:])]
    with cuda.tuned(kernels=True):
        assert kernels.enabled(), kernels.status()
        ours = kernels.qk_rope(streams, H, pe, layers.qk_rope_ops)
    ref = layers.qk_rope_ops(streams, H, pe)
    np.testing.assert_array_equal(np.array(ours[2].astype(mx.float32)), np.array(ref[2].astype(mx.float32)))
    for a, b in zip(ours[:2], ref[:2]):
        assert a.shape == b.shape
        ulps = _bf16_ulps(a, b)
        # the mean square is summed in another order than mx.fast.rms_norm's: a rounding may flip
        assert (ulps > 0).mean() < 0.01 and ulps.max() <= 2


@on_cuda
def test_the_gelu_concat_kernel_gives_the_float32_ops_values():
    mx.random.seed(1)
    attn = mx.random.normal((1, 16, 3 * 64)).astype(mx.bfloat16)
    h = (mx.random.normal((1, 16, 5 * 64)) * 3).astype(mx.bfloat16)
    with cuda.tuned(kernels=True):
        assert kernels.enabled(), kernels.status()
        ours = kernels.gelu_concat(attn, h, 2 * 64, layers._concat_act)
    ref = mx.concatenate([attn, layers.gelu_f32(h[..., 2 * 64 :])], axis=-1)
    assert ours.shape == ref.shape == (1, 16, 6 * 64)
    assert mx.array_equal(ours[..., : 3 * 64], attn).item()
    assert _bf16_ulps(ours, ref).max() <= 1


@on_cuda
def test_the_kernels_gradients_are_the_ops_gradients():
    streams, pe = _streams(mx.bfloat16)
    src = [s[0] for s in streams]
    # linear in the outputs, so that both ways get the same cotangents
    c = [mx.random.normal((1, 16, H, D)) for _ in range(3)]

    def loss(use, *src):
        with cuda.tuned(kernels=use):
            assert kernels.enabled() is use, kernels.status()
            out = kernels.qk_rope([(x, *s[1:]) for x, s in zip(src, streams)], H, pe, layers.qk_rope_ops)
        return sum((o.astype(mx.float32) * w).sum() for o, w in zip(out, c))

    ours = mx.grad(lambda *s: loss(True, *s), argnums=(0, 1))(*src)
    ref = mx.grad(lambda *s: loss(False, *s), argnums=(0, 1))(*src)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))


def test_off_keeps_the_kernels_out_on_its_thread_only(cuda_paths, monkeypatch):
    import threading

    monkeypatch.setattr(cuda_paths, "TUNING", cuda_paths.Tuning(kernels=True))
    monkeypatch.setattr(kernels, "_load_cubin", lambda: b"code")
    seen = []
    with kernels.off():
        assert not kernels.enabled()
        other = threading.Thread(target=lambda: seen.append(kernels.enabled()))
        other.start()
        other.join()
    assert seen == [True] and kernels.enabled()
