"""`mflux convert FILE.gguf`: GGUF files of a tiny FLUX.1, written with the gguf package, against
`gguf.quants.dequantize` (the stored weights) and a diffusers folder holding the same weights (the image).

The tiny transformer is 64 wide with a 256-wide MLP, so its weights suit the blocks as a real file's do:
K-types where the row is a multiple of 256 (random but valid blocks: gguf cannot quantize K-types),
a legacy type (quantized by gguf) where it is a multiple of 32, F32 for 1-D tensors.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch

from mflux.convert import convert
from mflux.converters import diffusers
from mflux.manifest import remake_command
from mflux.runtime.weights import TensorSource
from tests.test_convert import assert_refused, image, invoke, source_image

LEGACY = ("Q8_0", "Q5_1", "Q4_0", "Q5_0", "Q4_1")
K_TYPES = ("Q4_K", "Q6_K", "Q2_K", "Q3_K", "Q5_K")
# Byte offsets of each block's float16 scales (d, and dmin where the type has one).
_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}


def bfl_weights(folder: Path) -> dict[str, np.ndarray]:
    """The tiny pipeline's transformer in Black Forest Labs' names, as float32."""
    raw = {
        k: v
        for f in sorted((folder / "transformer").glob("*.safetensors"))
        for k, v in mx.load(str(f)).items()
    }
    return {k: np.array(v.astype(mx.float32)) for k, v in diffusers.sanitize_transformer(raw).items()}


def pick_types(weights: dict) -> dict[str, str]:
    """A mix as the shared files have: every legacy and K-type used somewhere, F16 for a few weights."""
    types, legacy, k = {}, 0, 0
    for name, w in weights.items():
        if w.ndim == 1:
            types[name] = "F32"
        elif w.shape[-1] % 256 == 0:
            types[name], k = K_TYPES[k % len(K_TYPES)], k + 1
        elif name.startswith("final_layer."):
            types[name] = "BF16" if "adaLN" in name else "F16"
        else:
            types[name], legacy = LEGACY[legacy % len(LEGACY)], legacy + 1
    return types


def random_blocks(kind: str, shape: tuple, rng) -> np.ndarray:
    """Random bytes as blocks of `kind`, with small finite float16 scales: random weights."""
    qtype = gguf.GGMLQuantizationType[kind]
    blocks = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    view = blocks.reshape(-1, size)
    for offset in _SCALES[kind]:
        scales = rng.uniform(0.5e-5, 3e-5, view.shape[0]).astype(np.float16)
        view[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks


def close(writer) -> None:
    """Write a GGUFWriter's header, metadata and tensors, then close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(
    path: Path, weights: dict, types: dict, arch: str = "flux", flattened: tuple = ()
) -> dict[str, np.ndarray]:
    """A GGUF file of `weights` in `types`; returns what gguf dequantizes each tensor to (the reference).
    The `flattened` ones are stored 1-D with their shape under `comfy.gguf.orig_shape.<name>`, as
    ComfyUI-GGUF's writer stores tensors it reshapes."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    for name in flattened:
        writer.add_array(f"comfy.gguf.orig_shape.{name}", list(weights[name].shape))
    for name, w in weights.items():
        kind = types[name]
        qtype = gguf.GGMLQuantizationType[kind]
        w = w.reshape(-1) if name in flattened else w
        if kind == "F32":
            writer.add_tensor(name, w.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        elif kind in (*LEGACY, "BF16"):
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            blocks = random_blocks(kind, w.shape, rng)
            writer.add_tensor(name, blocks, raw_dtype=qtype)
    close(writer)
    reader = gguf.GGUFReader(path)
    return {
        t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type).reshape(weights[t.name].shape))
        for t in reader.tensors
    }


@pytest.fixture(scope="module")
def tiny_gguf(tiny_schnell, tmp_path_factory):
    """(the GGUF file, {name: its exact float32 values}, {name: its GGUF type})."""
    weights = bfl_weights(tiny_schnell)
    types = pick_types(weights)
    path = tmp_path_factory.mktemp("gguf") / "flux1-schnell-mix.gguf"
    return path, write_gguf(path, weights, types), types


def stored_transformer(stored) -> dict[str, mx.array]:
    return {
        k: v
        for f in TensorSource.from_folder(stored.path / "transformer").files
        for k, v in mx.load(str(f.path)).items()
    }


def test_types_cover_every_legacy_and_k_type(tiny_gguf):
    _, _, types = tiny_gguf
    assert set(LEGACY) | set(K_TYPES) | {"F32", "F16", "BF16"} == set(types.values())


def test_float32_is_exact_and_bfloat16_rounds_once(tiny_gguf, tiny_schnell, mflux_home):
    path, reference, types = tiny_gguf
    exact = convert(str(path), base=str(tiny_schnell), dtype="float32", name="exact", progress=False)
    rounded = convert(str(path), base=str(tiny_schnell), name="rounded", progress=False)
    got32, got16 = stored_transformer(exact), stored_transformer(rounded)
    assert set(got32) == set(reference) == set(got16)
    for name, ref in reference.items():
        assert got32[name].dtype == mx.float32 and np.array_equal(np.array(got32[name]), ref), name
        once = torch.from_numpy(ref).to(torch.bfloat16).view(torch.int16).numpy()  # round-to-nearest-even
        assert got16[name].dtype == mx.bfloat16, name
        assert np.array_equal(np.array(got16[name].view(mx.int16)), once), name
    source = exact.manifest.source
    assert source["format"].startswith("gguf ") and source["tensor_types"] == {"transformer": types}
    assert source["keep_gguf_quantization"] is False and not exact.manifest.quantization


def diffusers_folder_of(folder: Path, weights: dict, dest: Path, monkeypatch) -> Path:
    """A copy of the tiny diffusers pipeline whose transformer holds `weights` (BFL names), renamed by
    diffusers' own single-file mapping (its one hard-coded width set to the tiny model's)."""
    import types as pytypes

    from diffusers.loaders import single_file_model
    from safetensors.torch import save_file

    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    fn = entry["checkpoint_mapping_fn"]
    consts = tuple(64 if type(c) is int and c == 3072 else c for c in fn.__code__.co_consts)
    mapping = pytypes.FunctionType(fn.__code__.replace(co_consts=consts), fn.__globals__, fn.__name__)
    state = mapping({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    shutil.copytree(folder, dest)
    for f in (dest / "transformer").glob("*.safetensors*"):
        f.unlink()
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        dest / "transformer" / "diffusion_pytorch_model.safetensors",
    )
    return dest


def test_image_equals_the_diffusers_folder_of_the_same_weights(
    tiny_gguf, tiny_schnell, tmp_path, mflux_home, monkeypatch
):
    path, reference, _ = tiny_gguf
    folder = diffusers_folder_of(
        tiny_schnell, reference, tmp_path / "FLUX.1-schnell-dequantized", monkeypatch
    )
    stored = convert(str(path), base=str(tiny_schnell), dtype="float32", progress=False)
    ours, ref = image(stored.path), source_image(folder)
    print(f"GGUF (float32) vs diffusers folder: max |diff| = {np.abs(ours.astype(int) - ref).max()}")
    assert np.abs(ours.astype(int) - ref).max() <= 2


def test_keep_gguf_quantization_dequantizes_to_gguf_values(tiny_gguf, tiny_schnell, mflux_home):
    path, reference, types = tiny_gguf
    code, _, err = invoke(
        "convert", path, "--base", tiny_schnell, "--keep-gguf-quantization", "--name", "kept"
    )
    assert code == 0, err
    from mflux.store import Store

    stored = Store().get("kept")
    got = stored_transformer(stored)
    q = stored.manifest.quantization["transformer"]
    assert q["group_size"] == 32 and q["mode"] == "affine"
    for name, ref in reference.items():
        layer = name.removesuffix(".weight")
        if types[name] in LEGACY:
            bits = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4}[types[name]]
            assert q.get("layers", {}).get(layer, q)["bits"] == bits, layer
            scales, biases = got[f"{layer}.scales"], got[f"{layer}.biases"]
            assert scales.dtype == biases.dtype == mx.float32
            values = mx.dequantize(got[name], scales, biases, group_size=32, bits=bits)
            assert np.array_equal(np.array(values), ref), name
        else:  # K-types and floats are dequantized, here to the default bfloat16
            assert f"{layer}.scales" not in got and got[name].dtype == mx.bfloat16, name
    assert stored.manifest.source["keep_gguf_quantization"] is True
    assert "--keep-gguf-quantization --name kept --force" in remake_command(stored.manifest)
    assert image(stored.path).std() > 10  # the quantized layers load and run


def test_group_size_quantizes_and_is_kept_in_the_remake_command(tiny_gguf, tiny_schnell, mflux_home):
    # --group-size is convert's for every source, so remaking a GGUF converted with it must repeat it.
    path, reference, _ = tiny_gguf
    stored = convert(str(path), base=str(tiny_schnell), bits=4, group_size=32, progress=False)
    assert stored.manifest.quantization["transformer"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert "--bits 4 --group-size 32 --name" in remake_command(stored.manifest)


def test_bits_quantizes_the_dequantized_weights(tiny_gguf, tiny_schnell, mflux_home):
    path, reference, _ = tiny_gguf
    stored = convert(str(path), base=str(tiny_schnell), bits=8, dtype="float32", progress=False)
    assert stored.manifest.quantization["transformer"] == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert "--dtype float32 --bits 8 --name" in remake_command(stored.manifest)
    got = stored_transformer(stored)
    name = "double_blocks.0.img_attn.qkv.weight"
    expected = mx.quantize(mx.array(reference[name]), group_size=64, bits=8)
    assert all(
        np.array_equal(np.array(a), np.array(b))
        for a, b in zip(expected, (got[name], got[name[:-7] + ".scales"], got[name[:-7] + ".biases"]))
    )


def test_a_reshaped_tensor_takes_its_recorded_shape(tiny_schnell, tmp_path, mflux_home):
    weights = bfl_weights(tiny_schnell)
    types = {**pick_types(weights), "img_in.weight": "F32", "txt_in.weight": "Q8_0"}
    path = tmp_path / "reshaped.gguf"
    reference = write_gguf(path, weights, types, flattened=("img_in.weight", "txt_in.weight"))
    # Blocks run along the flattened tensor, so a reshaped legacy tensor's blocks are its rows' groups too.
    stored = convert(
        str(path), base=str(tiny_schnell), dtype="float32", keep_gguf_quantization=True, progress=False
    )
    got = stored_transformer(stored)
    assert np.array_equal(np.array(got["img_in.weight"]), reference["img_in.weight"])
    w, scales, biases = (got[f"txt_in.{k}"] for k in ("weight", "scales", "biases"))
    values = mx.dequantize(w, scales, biases, group_size=32, bits=8)
    assert np.array_equal(np.array(values), reference["txt_in.weight"])


def test_detected_by_content_not_name(tiny_gguf, tiny_schnell, tmp_path, mflux_home):
    path, reference, _ = tiny_gguf
    disguised = tmp_path / "transformer.safetensors"
    shutil.copy(path, disguised)
    stored = convert(str(disguised), base=str(tiny_schnell), dtype="float32", progress=False)
    assert stored.manifest.source["format"].startswith("gguf ")


# --- refusals: one line, nothing written ---------------------------------------------------------------


def small_gguf(path: Path, arch: str = "flux", kind: str = "Q8_0") -> Path:
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    write_gguf(path, {"img_in.weight": w}, {"img_in.weight": kind}, arch)
    return path


@pytest.mark.parametrize("arch", ["sd3", "flux2", "llama"])
def test_another_architecture_is_refused(arch, tiny_schnell, tmp_path, mflux_home):
    f = small_gguf(tmp_path / "model.gguf", arch)
    assert_refused(
        mflux_home, ["convert", f, "--base", tiny_schnell], f"architecture {arch!r}", "not a FLUX.1"
    )


def test_truncated_file_is_refused(tiny_gguf, tiny_schnell, tmp_path, mflux_home):
    path, _, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    assert_refused(
        mflux_home, ["convert", cut, "--base", tiny_schnell], str(cut), "truncated or damaged GGUF file"
    )


def test_unknown_quantization_type_is_refused(tiny_schnell, tmp_path, mflux_home):
    f = small_gguf(tmp_path / "odd.gguf")
    reader = gguf.GGUFReader(f, "r+")
    reader.tensors[0].field.parts[4][0] = 250  # a type number ggml never used
    reader.data.flush()
    del reader
    assert_refused(
        mflux_home, ["convert", f, "--base", tiny_schnell], str(f), "unknown GGUF quantization type"
    )


def test_unsupported_type_is_refused(tiny_schnell, tmp_path, mflux_home):
    f = tmp_path / "ternary.gguf"
    writer = gguf.GGUFWriter(str(f), "flux")
    writer.add_tensor("img_in.weight", np.zeros((64, 64), np.int8))
    close(writer)
    assert_refused(mflux_home, ["convert", f, "--base", tiny_schnell], "img_in.weight is stored as I8")


def test_flag_misuse_is_refused(tiny_gguf, tiny_schnell, tmp_path, mflux_home):
    path, _, _ = tiny_gguf
    assert_refused(
        mflux_home,
        ["convert", path, "--base", tiny_schnell, "--bits", "4", "--keep-gguf-quantization"],
        "choose one",
    )
    assert_refused(mflux_home, ["convert", tiny_schnell, "--keep-gguf-quantization"], "a GGUF file only")
    assert_refused(mflux_home, ["convert", path], "holds only the transformer", "--base schnell")


def test_missing_gguf_package_is_one_line(tiny_gguf, tiny_schnell, mflux_home, monkeypatch):
    import sys

    from mflux import convert_gguf

    convert_gguf._parsed.cache_clear()
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    path, _, _ = tiny_gguf
    assert_refused(
        mflux_home, ["convert", path, "--base", tiny_schnell], "needs the gguf package (pip install gguf"
    )


# --- memory ------------------------------------------------------------------------------------------

# Converts argv[1] with the base argv[2] at dtype argv[3] (argv[4] "1": keeping the GGUF's blocks) and
# prints the baseline RssAnon after imports, its peak while converting, the seconds and the size stored.
MEASURED_CONVERT = r"""
import json, sys, threading, time
import huggingface_hub.utils  # the progress bar's module, imported when convert starts
from mflux.convert import convert
import mflux.convert_gguf, gguf.quants

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

baseline, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
path, base, dtype, keep = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
stored = convert(path, base=base, dtype=dtype, keep_gguf_quantization=keep, name="big", progress=False)
seconds = time.perf_counter() - start
done.set()
peak = max(peak[0], anon())
print(json.dumps({"baseline": baseline, "peak": peak, "s": seconds, "stored": stored.size_bytes}))
"""


def measured_convert(path: Path, base: Path, dtype: str = "bfloat16", keep: bool = False, env=None) -> dict:
    """MEASURED_CONVERT's figures, run in a child process (so its memory is the conversion's alone)."""
    cmd = [sys.executable, "-c", MEASURED_CONVERT, str(path), str(base), dtype, "1" if keep else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_tensor_streams_into_its_shard_a_block_of_rows_at_a_time(tiny_schnell, tmp_path, mflux_home):
    # Peak anonymous memory (the file itself is mapped: page cache) stays far below the output, which a
    # shard would hold whole: tensors stream into their shard. bench/gguf_convert.py measures full width.
    from tests.test_convert import bfl_shapes

    rng = np.random.default_rng(0)
    shapes = bfl_shapes(hidden=1024, depth=1, single=1)
    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(str(path), "flux", use_temp_file=True)
    for name, shape in shapes.items():
        if len(shape) == 1 or shape[-1] % 32:
            writer.add_tensor(name, np.zeros(shape, np.float32))
        else:
            writer.add_tensor(
                name, random_blocks("Q8_0", shape, rng), raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
    close(writer)
    output = sum(int(np.prod(s)) * 2 for s in shapes.values())  # bfloat16
    largest = max(int(np.prod(s)) * 2 for s in shapes.values())
    figures = measured_convert(path, tiny_schnell)
    grown = figures["peak"] - figures["baseline"]
    print(
        f"output {output / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB, peak RssAnon grew {grown / 1e6:.0f} MB"
    )
    assert grown < output / 2


def test_bits_quantizes_any_source_while_converting(tiny_schnell, mflux_home):
    # --bits is convert's, not GGUF's only: a folder's quantizable components, as `mflux quantize`.
    stored = convert(str(tiny_schnell), bits=8, progress=False)
    q = stored.manifest.quantization
    assert set(q) == {"transformer", "text_encoder", "text_encoder_2"} and q["transformer"]["bits"] == 8
    assert remake_command(stored.manifest).startswith("mflux quantize ")
    assert image(stored.path).std() > 10


def test_keys_of_no_known_layout_are_refused(tiny_schnell, tmp_path, mflux_home):
    f = small_gguf(tmp_path / "partial.gguf")  # architecture flux, but only img_in
    assert_refused(
        mflux_home, ["convert", f, "--base", tiny_schnell], "not a FLUX.1 transformer checkpoint", "no tensor"
    )
