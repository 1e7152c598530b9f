"""Reading a component's weights on CUDA's paths (mflux.runtime.cuda.load, run here through the
`cuda_paths` fixture): several threads (`Tuning.load_threads`) give the same arrays as the portable
load, quantized or not, and a thread's error reaches the caller; the transformer read while the prompts
encode (`Tuning.overlap_load`); the large components read on MLX's CPU stream
(`Tuning.cpu_read_min_bytes`), moved to the device and copied into its memory."""

import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mflux.errors import MfluxError
from mflux.folders import open_folder
from mflux.runtime import device, loader
from mflux.runtime.folder import COMPONENTS
from mflux.runtime.quantization import QuantSpec


@contextmanager
def _portable():
    """`device.cuda()` None inside, as off CUDA: the loader's own path, without the tuning."""
    saved = device._cuda
    device._cuda = False
    try:
        yield
    finally:
        device._cuda = saved


def _load(cuda, folder, threads, spec=None, dtype=mx.float32):
    """Every component of `folder`, read by `threads` threads on CUDA's path (None: the portable load)."""
    mf = open_folder(folder)

    def load():
        return {
            c: dict(tree_flatten(loader.load_component(mf, c, dtype, spec).parameters())) for c in COMPONENTS
        }

    if threads is None:
        with _portable():
            return load()
    with cuda.tuned(load_threads=threads):
        return load()


def _assert_same(one: dict, other: dict) -> None:
    for c in COMPONENTS:
        assert one[c].keys() == other[c].keys()
        for name in one[c]:
            np.testing.assert_array_equal(
                np.array(one[c][name]), np.array(other[c][name]), err_msg=f"{c} {name}"
            )


@pytest.mark.parametrize("spec", [None, QuantSpec(4)])
def test_several_threads_load_the_same_weights(tiny_schnell, cuda_paths, monkeypatch, spec):
    one = _load(cuda_paths, tiny_schnell, None, spec)
    threads = set()
    real = cuda_paths.load.evaluate
    monkeypatch.setattr(
        cuda_paths.load, "evaluate", lambda *a, **k: threads.add(threading.get_ident()) or real(*a, **k)
    )
    four = _load(cuda_paths, tiny_schnell, 4, spec)
    assert len(threads - {threading.get_ident()}) >= 2  # read on threads other than the caller's
    _assert_same(one, four)


def test_several_threads_load_a_stored_quantized_model(tiny_schnell, cuda_paths):
    from mflux.convert import quantize

    stored = quantize(str(tiny_schnell), bits=4, dtype="float32").path  # scales read, not computed
    one, four = _load(cuda_paths, stored, None), _load(cuda_paths, stored, 4)
    assert any(name.endswith(".scales") for name in four["transformer"])
    _assert_same(one, four)


def test_a_threads_error_reaches_the_caller(cuda_paths):
    def lazy(stream):
        raise MfluxError("shard 3 could not be read")

    weights = {"a.weight": mx.zeros(4), "b.weight": mx.ones(4)}
    with cuda_paths.tuned(load_threads=2), pytest.raises(MfluxError, match="shard 3"):
        cuda_paths.load.read(weights, lazy, Path("unread"), "transformer", "mlx", mx.float32, None)


def _overlapping(cuda, monkeypatch, memory: int):
    """CUDA's overlap turned on, on a device of `memory` bytes; returns the threads that loaded the
    transformer."""
    monkeypatch.setattr(cuda, "TUNING", replace(cuda.TUNING, overlap_load=True))
    monkeypatch.setattr(mx, "device_info", lambda: {"total_memory": memory})
    threads = set()
    real = loader.load_component

    def spy(folder, component, *a, **k):
        if component == "transformer":
            threads.add(threading.current_thread().name)
        return real(folder, component, *a, **k)

    monkeypatch.setattr("mflux.runtime.models.load_component", spy)
    return threads


def test_the_transformer_is_read_while_the_prompt_encodes_where_memory_allows(
    tiny_schnell, cuda_paths, monkeypatch
):
    """`Flux1.generate` where the tuning overlaps loads (CUDA) reads the transformer in a thread of its
    own once T5 and CLIP are loaded, and the image is the one a sequential load makes."""
    from mflux import Config, Flux1

    config = Config(2, 64, 64)
    alone = Flux1.from_path(tiny_schnell, precision="float32").generate_image(
        seed=3, prompt="a red fox", config=config
    )
    threads = _overlapping(cuda_paths, monkeypatch, memory=1 << 40)
    overlapped = Flux1.from_path(tiny_schnell, precision="float32").generate_image(
        seed=3, prompt="a red fox", config=config
    )
    assert threads and all(t.startswith("mflux-prefetch") for t in threads)
    np.testing.assert_array_equal(np.array(alone.image), np.array(overlapped.image))


def test_no_overlap_where_the_device_cannot_hold_both(tiny_schnell, cuda_paths, monkeypatch):
    from mflux import Config, Flux1

    files = sum(
        f.stat().st_size for c in cuda_paths.load.OVERLAPPED for f in (tiny_schnell / c).glob("*.safetensors")
    )
    threads = _overlapping(cuda_paths, monkeypatch, memory=2 * files - 1)
    Flux1.from_path(tiny_schnell, precision="float32").generate_image(
        seed=3, prompt="a red fox", config=Config(1, 64, 64)
    )
    assert threads == {threading.main_thread().name}


def test_no_overlap_off_cuda(tiny_schnell, cuda_paths, monkeypatch):
    """The overlap is the CUDA tuning's: the portable runtime loads one phase at a time."""
    from mflux import Config, Flux1

    threads = _overlapping(cuda_paths, monkeypatch, memory=1 << 40)
    with _portable():
        Flux1.from_path(tiny_schnell, precision="float32").generate_image(
            seed=3, prompt="a red fox", config=Config(1, 64, 64)
        )
    assert threads == {threading.main_thread().name}


def test_a_failed_background_read_is_one_error_when_the_transformer_is_needed(
    tiny_schnell, cuda_paths, monkeypatch, tmp_path
):
    import shutil

    from mflux import Config, Flux1

    broken = tmp_path / "model"
    shutil.copytree(tiny_schnell, broken)
    for shard in (broken / "transformer").glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated
    threads = _overlapping(cuda_paths, monkeypatch, memory=1 << 40)
    flux = Flux1.from_path(broken, precision="float32")
    with pytest.raises(MfluxError, match="transformer"):
        flux.generate_image(seed=3, prompt="a red fox", config=Config(1, 64, 64))
    assert all(t.startswith("mflux-prefetch") for t in threads) and threads


def test_no_overlap_for_quantized_weights(tiny_schnell, cuda_paths, monkeypatch):
    """Who quantizes asks for memory: T5 and the transformer are then never held at once."""
    from mflux import Config, Flux1

    threads = _overlapping(cuda_paths, monkeypatch, memory=1 << 40)
    Flux1.from_path(tiny_schnell, precision="float32", quantize=4).generate_image(
        seed=3, prompt="a red fox", config=Config(1, 64, 64)
    )
    assert threads == {threading.main_thread().name}


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("spec", [None, QuantSpec(8)])
def test_loading_on_the_cpu_stream_gives_the_same_weights_and_moves_every_array(
    tiny_schnell, cuda_paths, monkeypatch, threads, spec
):
    """`Tuning.cpu_read_min_bytes`: the components whose load only reads (the Hugging Face layout's text
    encoders, stored in the dtype asked for, not quantized) read every shard they evaluate with
    `mx.load(..., stream=mx.cpu)`, and each of their parameters is moved once its group is evaluated
    (here, with no CUDA driver to prefetch, by the GPU pass) and copied (`_device_copy`); the others
    read on the default stream and are neither moved nor copied (on CUDA, the prefetch's host pointer
    would first turn a device buffer into managed memory). The weights are the default stream's."""
    default = _load(cuda_paths, tiny_schnell, threads, spec, mx.bfloat16)  # the files' dtype: no cast
    load = cuda_paths.load
    copied, moved, streams, evaluated = [], [], [], []
    real_copy, real_move, real_read = load._device_copy, load._move_to_device, mx.load
    monkeypatch.setattr(load, "_device_copy", lambda a: copied.append(a.shape) or real_copy(a))
    monkeypatch.setattr(load, "_move_to_device", lambda arrays: moved.extend(arrays) or real_move(arrays))

    def read(path, *a, **k):
        streams.append((Path(path).parent.name, k.get("stream")))
        return real_read(path, *a, **k)

    def lazy(folder, component, dtype, spec, stream=None):  # a thread's copy: the arrays it evaluates
        evaluated.append((component, stream))
        return real_lazy(folder, component, dtype, spec, stream)

    real_lazy = loader._lazy_weights
    monkeypatch.setattr(mx, "load", read)
    monkeypatch.setattr(loader, "_lazy_weights", lazy)
    with cuda_paths.tuned(cpu_read_min_bytes=0):
        on_cpu = _load(cuda_paths, tiny_schnell, threads, spec, mx.bfloat16)
    cpu = [c for c in COMPONENTS if spec is None and c in load.RENAMED_ONLY]
    for c in COMPONENTS:
        # what a component that only reads evaluates is read on the CPU stream; a load that computes
        # reads nothing there (the lazy read that checks the names is never evaluated)
        assert {s for name, s in evaluated if name == c} == ({mx.cpu} if c in cpu else {None}), c
        assert (mx.cpu in {s for name, s in streams if name == c}) is (c in cpu), c
    # each CPU-stream parameter is moved and copied once its group is evaluated, and nothing the GPU computed
    assert len(moved) == sum(len(on_cpu[c]) for c in cpu)
    assert len(copied) == len(moved)
    for c in COMPONENTS:
        assert default[c].keys() == on_cpu[c].keys()
        for name in default[c]:
            assert mx.array_equal(default[c][name], on_cpu[c][name]).item(), f"{c} {name}"


def test_a_component_under_the_size_floor_reads_on_the_default_stream(tiny_schnell, cuda_paths):
    """`Tuning.cpu_read_min_bytes`: a component of fewer bytes reads on the default stream, as CUDA's
    CLIP and VAE do; None reads nothing on the CPU stream."""
    mf = open_folder(tiny_schnell)
    where = mf.path / "text_encoder_2"
    size = sum(f.stat().st_size for f in where.glob("*.safetensors"))
    for floor, expected in [(size, True), (size + 1, False), (None, False)]:
        with cuda_paths.tuned(cpu_read_min_bytes=floor):
            assert (
                cuda_paths.load.reads_on_cpu(where, "text_encoder_2", mf.format, mx.bfloat16, None)
                is expected
            )


def test_a_device_copy_keeps_every_bit():
    """cuda.load._device_copy: signed zeros, NaN payloads, subnormals and integers come out as they
    went in."""
    from mflux.runtime.cuda import load

    bits = np.array([0x8000, 0x7FC1, 0x0001, 0x3F80, 0xFF81, 0], dtype=np.uint16)
    for a in [
        mx.array(bits).view(mx.bfloat16),
        mx.array(bits.view(np.float16)),
        mx.arange(7, dtype=mx.uint32),
    ]:
        mx.eval(a)
        b = load._device_copy(a)
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(np.array(b.view(mx.uint8)), np.array(a.view(mx.uint8)))


def test_a_cast_keeps_the_read_on_the_default_stream(tiny_schnell, cuda_paths, monkeypatch):
    """Stored in bfloat16 and loaded as float32: the cast would read the CPU stream's pages from the
    GPU, so even the text encoders read on the default stream."""
    mf = open_folder(tiny_schnell)
    streams = []
    real_load = mx.load
    monkeypatch.setattr(mx, "load", lambda *a, **k: streams.append(k.get("stream")) or real_load(*a, **k))
    with cuda_paths.tuned(cpu_read_min_bytes=0):
        loader.load_component(mf, "text_encoder_2", mx.float32)
    assert streams and set(streams) == {None}


def test_prefetch_moves_nothing_off_cuda_and_says_so():
    """cuda.driver.prefetch is CUDA's; elsewhere it reports False, and the loader then touches each
    group on the GPU instead (`cuda.load._move_to_device`)."""
    from mflux.runtime.cuda import driver

    if device.backend() == "cuda":
        pytest.skip("this backend prefetches")
    a = mx.ones((4, 4), dtype=mx.bfloat16)
    mx.eval(a)
    assert driver.prefetch([a]) is False
    driver.prefetch_wait()  # nothing to wait for
