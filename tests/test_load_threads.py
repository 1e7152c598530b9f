"""Reading a component's weights from several threads (mflux.runtime.loader.LOAD_THREADS, on CUDA): the
same arrays as one thread, quantized or not, and a thread's error reaches the caller."""

import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mflux.errors import MfluxError
from mflux.folders import open_folder
from mflux.runtime import loader
from mflux.runtime.folder import COMPONENTS
from mflux.runtime.quantization import QuantSpec


def _load(folder, threads, monkeypatch, spec=None, dtype=mx.float32):
    monkeypatch.setitem(loader.LOAD_THREADS, "cpu", threads)
    mf = open_folder(folder)
    return {c: dict(tree_flatten(loader.load_component(mf, c, dtype, spec).parameters())) for c in COMPONENTS}


@pytest.mark.parametrize("spec", [None, QuantSpec(4)])
def test_several_threads_load_the_same_weights(tiny_schnell, monkeypatch, spec):
    one = _load(tiny_schnell, 1, monkeypatch, spec)
    threads = set()
    real = loader.evaluate
    monkeypatch.setattr(
        loader, "evaluate", lambda *a, **k: threads.add(threading.get_ident()) or real(*a, **k)
    )
    four = _load(tiny_schnell, 4, monkeypatch, spec)
    assert len(threads - {threading.get_ident()}) >= 2  # read on threads other than the caller's
    for c in COMPONENTS:
        assert one[c].keys() == four[c].keys()
        for name in one[c]:
            np.testing.assert_array_equal(
                np.array(one[c][name]), np.array(four[c][name]), err_msg=f"{c} {name}"
            )


def test_several_threads_load_a_stored_quantized_model(tiny_schnell, monkeypatch):
    from mflux.convert import quantize

    stored = quantize(str(tiny_schnell), bits=4, dtype="float32").path  # scales read, not computed
    one, four = _load(stored, 1, monkeypatch), _load(stored, 4, monkeypatch)
    assert any(name.endswith(".scales") for name in four["transformer"])
    for c in COMPONENTS:
        assert one[c].keys() == four[c].keys()
        for name in one[c]:
            np.testing.assert_array_equal(
                np.array(one[c][name]), np.array(four[c][name]), err_msg=f"{c} {name}"
            )


def test_a_threads_error_reaches_the_caller():
    def lazy():
        raise MfluxError("shard 3 could not be read")

    with pytest.raises(MfluxError, match="shard 3"):
        loader.read_in_threads(lazy, {"a.weight": mx.zeros(4), "b.weight": mx.ones(4)}, 2)


def _overlapping(monkeypatch, memory: int):
    """The CPU told to overlap as CUDA does, on a device of `memory` bytes; returns the threads that
    loaded the transformer."""
    monkeypatch.setitem(loader.OVERLAP_LOAD, "cpu", True)
    monkeypatch.setattr(loader.mx, "device_info", lambda: {"total_memory": memory})
    threads = set()
    real = loader.load_component

    def spy(folder, component, *a, **k):
        if component == "transformer":
            threads.add(threading.current_thread().name)
        return real(folder, component, *a, **k)

    monkeypatch.setattr("mflux.flux1.load_component", spy)
    return threads


def test_the_transformer_is_read_while_the_prompt_encodes_where_memory_allows(tiny_schnell, monkeypatch):
    """`Flux1.generate` on a backend that overlaps loads (CUDA) reads the transformer in a thread of its
    own once T5 and CLIP are loaded, and the image is the one a sequential load makes."""
    from mflux import Config, Flux1

    config = Config(2, 64, 64)
    alone = Flux1.from_path(tiny_schnell, precision="float32").generate_image(
        seed=3, prompt="a red fox", config=config
    )
    threads = _overlapping(monkeypatch, memory=1 << 40)
    overlapped = Flux1.from_path(tiny_schnell, precision="float32").generate_image(
        seed=3, prompt="a red fox", config=config
    )
    assert threads and all(t.startswith("mflux-prefetch") for t in threads)
    np.testing.assert_array_equal(np.array(alone.image), np.array(overlapped.image))


def test_no_overlap_where_the_device_cannot_hold_both(tiny_schnell, monkeypatch):
    from mflux import Config, Flux1

    files = sum(f.stat().st_size for c in loader.OVERLAPPED for f in (tiny_schnell / c).glob("*.safetensors"))
    threads = _overlapping(monkeypatch, memory=2 * files - 1)
    Flux1.from_path(tiny_schnell, precision="float32").generate_image(
        seed=3, prompt="a red fox", config=Config(1, 64, 64)
    )
    assert threads == {threading.main_thread().name}


def test_a_failed_background_read_is_one_error_when_the_transformer_is_needed(
    tiny_schnell, monkeypatch, tmp_path
):
    import shutil

    from mflux import Config, Flux1

    broken = tmp_path / "model"
    shutil.copytree(tiny_schnell, broken)
    for shard in (broken / "transformer").glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated
    threads = _overlapping(monkeypatch, memory=1 << 40)
    flux = Flux1.from_path(broken, precision="float32")
    with pytest.raises(MfluxError, match="transformer"):
        flux.generate_image(seed=3, prompt="a red fox", config=Config(1, 64, 64))
    assert all(t.startswith("mflux-prefetch") for t in threads) and threads


def test_no_overlap_for_quantized_weights(tiny_schnell, monkeypatch):
    """Who quantizes asks for memory: T5 and the transformer are then never held at once."""
    from mflux import Config, Flux1

    threads = _overlapping(monkeypatch, memory=1 << 40)
    Flux1.from_path(tiny_schnell, precision="float32", quantize=4).generate_image(
        seed=3, prompt="a red fox", config=Config(1, 64, 64)
    )
    assert threads == {threading.main_thread().name}


@pytest.mark.parametrize("how", ["cpu", "cpu-copy"])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("spec", [None, QuantSpec(8)])
def test_loading_on_the_cpu_stream_gives_the_same_weights_and_moves_every_array(
    tiny_schnell, monkeypatch, threads, spec, how
):
    """loader.LOAD_STREAM "cpu": the components whose load only reads (the Hugging Face layout's text encoders,
    stored in the dtype asked for, not quantized) read every shard with `mx.load(..., stream=mx.cpu)`,
    and each of their parameters is moved once its group is evaluated (here, with no CUDA driver to
    prefetch, by the GPU pass); the others read on the default stream and are not moved (on CUDA, the
    prefetch's host pointer would first turn a device buffer into managed memory). The weights are the
    default path's; under "cpu-copy", as copies (`_device_copy`)."""
    default = _load(tiny_schnell, threads, monkeypatch, spec, mx.bfloat16)  # the files' dtype: no cast
    monkeypatch.setitem(loader.LOAD_STREAM, "cpu", how)
    copied = []
    real_copy = loader._device_copy
    monkeypatch.setattr(loader, "_device_copy", lambda a: copied.append(a.shape) or real_copy(a))
    streams, moved = [], []
    real_load, real_move = mx.load, loader._move_to_device

    def load(path, *a, **k):
        streams.append((Path(path).parent.name, k.get("stream")))
        return real_load(path, *a, **k)

    monkeypatch.setattr(loader.mx, "load", load)
    monkeypatch.setattr(loader, "_move_to_device", lambda arrays: moved.extend(arrays) or real_move(arrays))
    on_cpu = _load(tiny_schnell, threads, monkeypatch, spec, mx.bfloat16)
    read_on = {c: {s for name, s in streams if name == c} for c in COMPONENTS}
    cpu = [c for c in COMPONENTS if spec is None and c in loader.RENAMED_ONLY]
    for c in COMPONENTS:
        assert read_on[c] == ({mx.cpu} if c in cpu else {None}), c  # a load that computes: the default
    # each CPU-stream parameter is moved once its group is evaluated, and nothing the GPU computed
    assert len(moved) == sum(len(on_cpu[c]) for c in cpu)
    assert len(copied) == (len(moved) if how == "cpu-copy" else 0)
    for c in COMPONENTS:
        assert default[c].keys() == on_cpu[c].keys()
        for name in default[c]:
            assert mx.array_equal(default[c][name], on_cpu[c][name]).item(), f"{c} {name}"


def test_a_component_under_the_size_floor_reads_on_the_default_stream(tiny_schnell, monkeypatch):
    """loader.CPU_READ_MIN_BYTES: a component of fewer bytes reads on the default stream, as CUDA's
    CLIP and VAE do."""
    monkeypatch.setitem(loader.LOAD_STREAM, "cpu", "cpu-copy")
    mf = open_folder(tiny_schnell)
    size = sum(f.stat().st_size for f in (tiny_schnell / "text_encoder_2").glob("*.safetensors"))
    for floor, expected in [(size, True), (size + 1, False)]:
        monkeypatch.setitem(loader.CPU_READ_MIN_BYTES, "cpu", floor)
        where = mf.path / "text_encoder_2"
        assert loader.reads_on_cpu(where, "text_encoder_2", mf.format, mx.bfloat16, None) is expected


def test_a_device_copy_keeps_every_bit():
    """loader._device_copy: signed zeros, NaN payloads, subnormals and integers come out as they went in."""
    bits = np.array([0x8000, 0x7FC1, 0x0001, 0x3F80, 0xFF81, 0], dtype=np.uint16)
    for a in [
        mx.array(bits).view(mx.bfloat16),
        mx.array(bits.view(np.float16)),
        mx.arange(7, dtype=mx.uint32),
    ]:
        mx.eval(a)
        b = loader._device_copy(a)
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(np.array(b.view(mx.uint8)), np.array(a.view(mx.uint8)))


def test_a_cast_keeps_the_read_on_the_default_stream(tiny_schnell, monkeypatch):
    """Stored in bfloat16 and loaded as float32: the cast would read the CPU stream's pages from the
    GPU, so even the text encoders read on the default stream."""
    monkeypatch.setitem(loader.LOAD_STREAM, "cpu", "cpu-copy")
    mf = open_folder(tiny_schnell)
    streams = []
    real_load = mx.load
    monkeypatch.setattr(
        loader.mx, "load", lambda *a, **k: streams.append(k.get("stream")) or real_load(*a, **k)
    )
    loader.load_component(mf, "text_encoder_2", mx.float32)
    assert streams[-1] is None


def test_prefetch_moves_nothing_off_cuda_and_says_so():
    """device.prefetch is CUDA's; elsewhere it reports False, and the loader then touches each group on
    the GPU instead (`_move_to_device`)."""
    from mflux.runtime import device

    if device.backend() == "cuda":
        pytest.skip("this backend prefetches")
    a = mx.ones((4, 4), dtype=mx.bfloat16)
    mx.eval(a)
    assert device.prefetch([a]) is False
    device.prefetch_wait()  # nothing to wait for
