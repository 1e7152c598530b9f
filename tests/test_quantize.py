"""`mflux quantize`: stored quantization against runtime quantization, modes, components and refusals."""

import io
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mflux import Flux1
from mflux.convert import convert, quantize
from mflux.errors import InvalidArgument, MfluxError
from mflux.folders import open_folder
from mflux.manifest import COMPONENTS
from mflux.runtime.loader import load_component
from mflux.runtime.quantization import QuantSpec
from mflux.runtime.weights import TensorSource
from mflux.store import Store
from tests.fixtures import store_hf_folder
from tests.test_convert import assert_refused, image, invoke


@pytest.mark.parametrize("variant, bits, via", [("schnell", 4, "hf"), ("dev", 8, "mlx")])
def test_quantized_to_disk_equals_runtime_quantization(variant, bits, via, tiny_schnell, tiny_dev):
    folder = tiny_schnell if variant == "schnell" else tiny_dev
    # Runtime -q casts to the run's precision and then quantizes, so the stored scales are float32 too.
    source = str(folder) if via == "hf" else convert(str(folder), name=variant, dtype="float32").name
    stored = quantize(source, bits=bits, dtype="float32")
    assert stored.manifest.quantization == {
        c: {"bits": bits, "group_size": 64, "mode": "affine"}
        for c in ("transformer", "text_encoder", "text_encoder_2")
    }
    ours, ref = image(stored.path), image(folder, quantize=bits)
    assert ref.std() > 10
    print(
        f"{variant} q{bits} from {via}: stored vs runtime, max |diff| = {np.abs(ours.astype(int) - ref).max()}"
    )
    assert np.array_equal(ours, ref)
    assert not np.array_equal(ours, image(folder))  # quantization did change the image


def test_bfloat16_scales_equal_runtime_quantization_at_bfloat16(tiny_schnell):
    stored = quantize(str(tiny_schnell), bits=4, name="schnell-q4")
    assert stored.manifest.dtype == "bfloat16"
    ours = image(stored.path, precision="bfloat16")
    assert np.array_equal(ours, image(tiny_schnell, precision="bfloat16", quantize=4))


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_fp_modes_store_what_mlx_quantizes(mode, tiny_dev):
    stored = quantize(str(tiny_dev), mode=mode, dtype="float32")
    assert stored.name == f"FLUX.1-dev-{mode}"
    spec = QuantSpec.for_mode(mode)
    assert stored.manifest.quantization["transformer"] == spec.to_dict()
    hf, mlx_folder = open_folder(tiny_dev), open_folder(stored.path)
    for c in ("transformer", "text_encoder_2"):
        in_memory = dict(tree_flatten(load_component(hf, c, mx.float32, spec).parameters()))
        from_disk = dict(tree_flatten(load_component(mlx_folder, c, mx.float32).parameters()))
        assert in_memory.keys() == from_disk.keys()
        assert any(k.endswith(".scales") for k in from_disk)
        for k, v in in_memory.items():
            assert np.array_equal(np.array(v), np.array(from_disk[k])), k


def test_components_limit_what_is_quantized(tiny_schnell):
    stored = quantize(str(tiny_schnell), bits=8, components=["transformer"], name="t-only")
    assert list(stored.manifest.quantization) == ["transformer"]
    for c, quantized in (
        ("transformer", True),
        ("text_encoder", False),
        ("text_encoder_2", False),
        ("vae", False),
    ):
        keys = TensorSource.from_folder(stored.path / c).keys()
        assert any(k.endswith(".scales") for k in keys) == quantized, c
    # Layers whose input width is not a multiple of the group size stay in float: with group 128, the
    # tiny transformer's 64-wide inputs stay float and its 256-wide MLP outputs are quantized.
    g128 = quantize(str(tiny_schnell), bits=4, group_size=128, components=["transformer"], name="g128")
    t = TensorSource.from_folder(g128.path / "transformer")
    assert "double_blocks.0.img_mlp.2.scales" in t and "double_blocks.0.img_attn.qkv.scales" not in t
    assert t.dtype("double_blocks.0.img_attn.qkv.weight") == "BF16"


def test_model_defaults_to_the_last_used(tiny_schnell, mflux_home):
    store_hf_folder(tiny_schnell, "schnell")
    Store().mark_used("schnell")
    code, out, err = invoke("quantize", "--bits", "8")
    assert code == 0, err
    assert "quantizing schnell (the model used last)" in out
    assert "transformer: " in out and "bits/weight" in out
    assert Store().exists("schnell-q8") and Store().last_used() == "schnell-q8"
    # A quantized model used last leads back to its unquantized source (issue 14, item 5).
    code, out, err = invoke("quantize", "--bits", "4", "--group-size", "32")
    assert code == 0, err
    assert "quantizing schnell (the source of schnell-q8, the model used last)" in out
    assert Store().exists("schnell-q4-g32")
    # With that source gone there is no unquantized default: the error names the recorded source.
    Store().remove("schnell")
    Store().mark_used("schnell-q8")
    assert_refused(mflux_home, ["quantize", "--bits", "4"], "already quantized", "source model 'schnell'")


def test_refusals(tiny_schnell, mflux_home):
    assert_refused(mflux_home, ["quantize", "--bits", "4"], "no model given")
    store_hf_folder(tiny_schnell, "schnell")
    assert_refused(
        mflux_home, ["quantize", "schnell", "--bits", "4", "--name", "schnell", "--force"], "own source"
    )
    assert_refused(
        mflux_home, ["quantize", "schnell", "--mode", "mxfp4", "--bits", "8"], "mxfp4 fixes bits=4"
    )
    assert_refused(
        mflux_home, ["quantize", "schnell", "--mode", "nvfp4", "--group-size", "32"], "group size=16"
    )
    assert_refused(mflux_home, ["quantize", "schnell"], "--bits is required")
    assert_refused(mflux_home, ["quantize", "schnell", "--bits", "7"], "7")
    assert_refused(mflux_home, ["quantize", "schnell", "--bits", "4", "--components", "vae"], "vae")
    with pytest.raises(InvalidArgument, match="cannot quantize 'vae'"):
        quantize("schnell", bits=4, components=["vae"])
    code, _, err = invoke("quantize", "schnell", "--bits", "4")
    assert code == 0, err
    assert_refused(
        mflux_home, ["quantize", "schnell", "--bits", "8", "--name", "schnell-q4"], "already exists"
    )
    assert_refused(mflux_home, ["quantize", "schnell-q4", "--bits", "8"], "already quantized (q4)")
    # A stored quantization is inferred at load; a conflicting -q is refused, a matching one accepted.
    with pytest.raises(InvalidArgument, match="already quantized"):
        Flux1.from_path(Store().path("schnell-q4"), quantize=8)
    assert Flux1.from_path(Store().path("schnell-q4"), quantize=4).variant == "schnell"


def test_float16_keeps_t5_in_bfloat16(tiny_schnell, mflux_home):
    code, out, err = invoke("quantize", tiny_schnell, "--bits", "4", "--dtype", "float16", "--name", "half")
    assert code == 0, err
    assert err.strip() == "warning: T5 (text_encoder_2) is kept in bfloat16: float16 overflows in T5"
    man = Store().get("half").manifest
    assert man.dtype == "float16" and man.architecture["text_encoder_2"]["dtype"] == "bfloat16"
    for c, want in (("transformer", {"F16", "U32"}), ("text_encoder_2", {"BF16", "U32"}), ("vae", {"F16"})):
        t = TensorSource.from_folder(Store().path("half") / c)
        assert {t.dtype(k) for k in t.keys()} == want, c


def test_inspect_and_list_show_the_quantization(tiny_schnell):
    convert(str(tiny_schnell), name="base")
    quantize("base", bits=4, components=["transformer", "text_encoder_2"])
    quantize("base", mode="mxfp4")
    code, out, _ = invoke("list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "q4" in rows["base-q4"] and "mxfp4" in rows["base-mxfp4"] and " - " in rows["base"]
    code, out, _ = invoke("inspect", "base-q4")
    assert code == 0
    assert "4-bit affine" in out and "transformer" in out and "text_encoder_2" in out
    code, out, _ = invoke("inspect", "base-mxfp4")
    assert code == 0 and "mxfp4" in out


def test_cli_quantize_end_to_end(tiny_dev):
    store_hf_folder(tiny_dev, "dev")
    code, out, err = invoke("quantize", "dev", "--bits", "4", "--group-size", "32", "--dtype", "float32")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["transformer", "text_encoder", "text_encoder_2"]
    bpw = float(lines[0].split()[1])
    assert 4 + 32 * 2 / 32 <= bpw < 8  # 4-bit weights plus a float32 scale and bias per 32 weights
    assert lines[-1].startswith("stored dev-q4-g32")
    man = Store().get("dev-q4-g32").manifest
    assert man.quantization["transformer"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert man.source == {"kind": "model", "name": "dev"}
    spec = QuantSpec(bits=4, group_size=32)
    in_memory = load_component(open_folder(tiny_dev), "transformer", mx.float32, spec)
    from_disk = load_component(open_folder(Store().path("dev-q4-g32")), "transformer", mx.float32)
    a, b = dict(tree_flatten(in_memory.parameters())), dict(tree_flatten(from_disk.parameters()))
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert image(Store().path("dev-q4-g32")).std() > 10


def test_converting_a_quantized_model_is_refused(tiny_schnell):
    # It is MLX-native already; a convert would only re-cast its scales, under a name (q4-mlx) that hides it
    quantize(str(tiny_schnell), bits=4, name="q4")
    with pytest.raises(MfluxError, match=r"q4 is already quantized \(q4\).*mflux quantize \S+ --bits N"):
        convert("q4", dtype="float32")
    assert not Store().exists("q4-mlx")


def test_a_progress_bar_per_component_on_a_terminal(tiny_schnell, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    quantize(str(tiny_schnell), bits=8, name="bars")
    lines = err.getvalue().replace("\r", "\n").splitlines()
    finals = {c: [line for line in lines if line.startswith(f"{c}:")][-1] for c in COMPONENTS}
    for line in finals.values():
        assert "100%" in line, line  # each component's bar ends full, at the bytes written
    assert Store().exists("bars")
