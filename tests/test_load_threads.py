"""Reading a component's weights from several threads (mflux.runtime.loader.LOAD_THREADS, on CUDA): the
same arrays as one thread, quantized or not, and a thread's error reaches the caller."""

import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mflux.errors import MfluxError
from mflux.folders import open_folder
from mflux.runtime import loader
from mflux.runtime.folder import COMPONENTS
from mflux.runtime.quantization import QuantSpec


def _load(folder, threads, monkeypatch, spec=None):
    monkeypatch.setitem(loader.LOAD_THREADS, "cpu", threads)
    mf = open_folder(folder)
    return {
        c: dict(tree_flatten(loader.load_component(mf, c, mx.float32, spec).parameters())) for c in COMPONENTS
    }


@pytest.mark.parametrize("spec", [None, QuantSpec(4)])
def test_several_threads_load_the_same_weights(tiny_schnell, monkeypatch, spec):
    one = _load(tiny_schnell, 1, monkeypatch, spec)
    threads = set()
    real = loader.evaluate
    monkeypatch.setattr(loader, "evaluate", lambda *a: threads.add(threading.get_ident()) or real(*a))
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
