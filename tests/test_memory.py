"""The bound on how far MLX runs ahead of the device (mflux.runtime.memory, on CUDA
mflux.runtime.cuda.memory): it sets MLX's memory limit for one evaluation only, and an image made under
a tight bound is the image made without one. The CUDA tuning's bounds run here through the
`cuda_paths` fixture."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mflux import Config, Flux1
from mflux.runtime import memory
from mflux.runtime.cuda import GB, Tuning


def test_bounded_sets_the_limit_over_what_is_held_and_puts_it_back(cuda_paths):
    before = mx.get_memory_limit()
    held = mx.zeros((1 << 20,), dtype=mx.float32)
    mx.eval(held)
    with cuda_paths.memory.bounded(64 << 20):
        inside = mx.get_memory_limit()
        assert mx.get_active_memory() <= inside <= mx.get_active_memory() + (64 << 20)
        assert inside >= held.nbytes + (64 << 20)
    assert mx.get_memory_limit() == before
    with pytest.raises(RuntimeError), cuda_paths.memory.bounded(1 << 20):
        raise RuntimeError("an evaluation that fails")
    assert mx.get_memory_limit() == before  # put back on the way out of an error too
    # the portable door: the kind's headroom from the tuning
    with cuda_paths.tuned(headroom=64 << 20), memory.bounded("auto"):
        assert mx.get_active_memory() < mx.get_memory_limit() <= mx.get_active_memory() + (64 << 20)
    assert mx.get_memory_limit() == before


def test_no_bound_leaves_the_limit_alone(cuda_paths, monkeypatch):
    before = mx.get_memory_limit()
    with cuda_paths.memory.bounded(None):
        assert mx.get_memory_limit() == before
    with memory.bounded("auto"), memory.bounded("tight"), memory.bounded("train"):  # tuned to None
        assert mx.get_memory_limit() == before
    # off CUDA no kind is bounded, whatever the tuning says
    monkeypatch.setattr(
        cuda_paths,
        "TUNING",
        replace(cuda_paths.TUNING, headroom=1 << 20, tight_headroom=1 << 20, train_share=0.5),
    )
    monkeypatch.setattr("mflux.runtime.device._cuda", False)
    for kind in ("auto", "tight", "train"):
        with memory.bounded(kind):
            assert mx.get_memory_limit() == before, kind


def test_a_tight_bound_makes_the_same_image(tiny_schnell, cuda_paths, monkeypatch):
    cfg = Config(num_inference_steps=2, height=64, width=64)

    def image(headroom):
        with cuda_paths.tuned(headroom=headroom):
            flux = Flux1.from_path(tiny_schnell, precision="float32")
            return np.array(flux.generate_image(3, "a photo of a cat", cfg).image)

    free = image(None)
    assert free.std() > 10  # a real image, so equality means something
    limits = []
    real = mx.set_memory_limit

    def spy(limit):
        limits.append(limit)
        return real(limit)

    monkeypatch.setattr(mx, "set_memory_limit", spy)
    tight = image(1 << 16)  # 64 KB over what is held: every evaluation waits on the queue
    assert limits, "the engine's evaluations ran without the bound"
    np.testing.assert_array_equal(tight, free)


def test_the_tight_bound_is_tighter_than_a_steps(cuda_paths):
    """CUDA's defaults: the precomputed modulations (little work over many weights) run under a
    tighter bound than a step; each kind reads its own field."""
    assert Tuning().tight_headroom < Tuning().headroom
    with cuda_paths.tuned(headroom=3 << 20, tight_headroom=1 << 20):
        assert cuda_paths.memory.headroom("auto") == 3 << 20
        assert cuda_paths.memory.headroom("tight") == 1 << 20


def test_a_training_step_bounds_a_quarter_of_the_free_memory_at_least_the_steps_headroom(
    cuda_paths, monkeypatch
):
    """cuda.memory.headroom("train"): on a large device a training step runs unbounded in effect (H200:
    0.59 s against 0.79 s at 2 GB), on a small one within a share of what is left."""
    assert cuda_paths.memory.headroom("train") is None  # no share: no bound
    monkeypatch.setattr(cuda_paths, "TUNING", replace(cuda_paths.TUNING, train_share=0.25, headroom=2 * GB))
    held = mx.get_active_memory()
    for device, expected in (
        (140 * GB, (140 * GB - held) // 4),
        (8 * GB, 2 * GB),
    ):
        monkeypatch.setattr(cuda_paths.memory, "device_memory", lambda d=device: d)
        assert cuda_paths.memory.headroom("train") == expected
        with memory.bounded("train"):
            assert mx.get_memory_limit() == mx.get_active_memory() + expected


def test_modulations_evaluated_block_by_block_are_the_same_rows(tiny_schnell, monkeypatch):
    """The precomputed modulations evaluate each block's rows as they are made (so that a quantized
    model dequantizes one block's layers at a time); the rows are the same arrays as one graph's, and
    each block is evaluated on its own."""
    from mflux.folders import open_folder
    from mflux.runtime.loader import load_component
    from mflux.runtime.quantization import QuantSpec

    flux = load_component(open_folder(tiny_schnell), "transformer", mx.float32, QuantSpec(8))
    y = mx.random.normal((1, flux.params.vec_in_dim))
    whole = flux.modulations([1.0, 0.5], y)
    evals = []
    real = mx.eval
    with monkeypatch.context() as m:
        m.setattr(mx, "eval", lambda *a: evals.append(a) or real(*a))
        blocks = flux.modulations([1.0, 0.5], y, evaluate=True)
    assert len(evals) == len(flux.double_blocks) + len(flux.single_blocks) + 1
    assert mx.array_equal(whole, blocks)


def test_the_precomputed_modulations_evaluate_block_by_block_under_the_tight_bound(
    tiny_schnell, cuda_paths, monkeypatch
):
    """With `free_modulation_weights` (as `mflux run`), every block's modulation rows are evaluated
    within the tight bound, and the image is the one made without it."""
    cfg = Config(num_inference_steps=2, height=64, width=64)

    def image():
        flux = Flux1.from_path(tiny_schnell, precision="float32")
        out = flux.generate_image(3, "a photo of a cat", cfg, free_modulation_weights=True)
        t = flux.get("transformer")  # its blocks stay; only their modulation layers were freed
        return np.array(out.image), len(t.double_blocks) + len(t.single_blocks) + 1

    free, _ = image()
    monkeypatch.setattr(cuda_paths, "TUNING", replace(cuda_paths.TUNING, tight_headroom=1 << 16))
    bounded_evals = []
    real = mx.eval
    default = mx.get_memory_limit()

    def spy(*a):
        bounded_evals.append(mx.get_memory_limit() != default)
        return real(*a)

    monkeypatch.setattr(mx, "eval", spy)
    tight, n_blocks = image()
    assert sum(bounded_evals) >= n_blocks  # one evaluation a block, each within the bound
    np.testing.assert_array_equal(tight, free)
