"""`mflux convert` and the MLX-native format: against the hf source, BFL single files and diffusers."""

import functools
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mflux import Config, Flux1
from mflux.cli import cli
from mflux.convert import convert
from mflux.converters import diffusers
from mflux.errors import MfluxError
from mflux.folders import open_folder
from mflux.manifest import FORMAT_VERSION, MANIFEST, hash_files
from mflux.runtime.loader import COMPONENTS, build_module, iter_weights
from mflux.runtime.weights import SafetensorsFile, TensorSource
from mflux.store import Store
from tests.fixtures import packed_latents, store_hf_folder

PROMPT = "Luxury food photograph"
SIZE = 32
COMFY = "model.diffusion_model."


def image(path: Path, precision: str = "float32", **kwargs) -> np.ndarray:
    flux = Flux1.from_path(path, precision=precision, **kwargs)
    config = Config(num_inference_steps=2, height=SIZE, width=SIZE, guidance=4.0)
    return np.array(flux.generate_image(0, PROMPT, config, latents=packed_latents(3, SIZE, SIZE)).image)


@functools.cache
def source_image(folder: Path) -> np.ndarray:
    # The session fixtures never change, so their images are computed once.
    out = image(folder)
    assert out.std() > 10  # not a flat image, so equality means something
    return out


def write_bfl_twin(folder: Path, path: Path, prefix: str = "", extra: dict | None = None) -> Path:
    """The diffusers transformer of `folder` as a Black Forest Labs single file: the inverse of
    diffusers' conversion, i.e. the transformer's sanitize applied to the diffusers weights."""
    files = sorted((folder / "transformer").glob("*.safetensors"))
    raw = {k: v for f in files for k, v in mx.load(str(f)).items()}
    tensors = {prefix + k: v for k, v in diffusers.sanitize_transformer(raw).items()}
    mx.save_safetensors(str(path), {**tensors, **(extra or {})})
    return path


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def snapshot(home: Path) -> dict:
    """Every file of the store outside its temp area, with its size."""
    files = {p.relative_to(home).as_posix(): p.stat().st_size for p in home.rglob("*") if p.is_file()}
    return {k: v for k, v in files.items() if not k.startswith(".tmp/")}


def assert_refused(home: Path, args: list, *words: str) -> str:
    before = snapshot(home) if home.exists() else {}
    code, _, err = invoke(*args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    assert (snapshot(home) if home.exists() else {}) == before
    assert not leftovers(home), "a half-written model was left behind"
    return lines[0]


def leftovers(home: Path) -> list:
    tmp = home / ".tmp"
    return [p for p in tmp.iterdir() if p.suffix != ".lock"] if tmp.is_dir() else []


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_converted_model_gives_the_same_image(variant, tiny_schnell, tiny_dev):
    folder = tiny_schnell if variant == "schnell" else tiny_dev
    stored = convert(str(folder))
    assert stored.name == f"FLUX.1-{variant}-mlx"
    ours, ref = image(stored.path), source_image(folder)
    print(f"{variant}: converted vs hf source, max |diff| = {np.abs(ours.astype(int) - ref).max()}")
    assert np.array_equal(ours, ref)


def test_mlx_layout_is_what_the_loader_yields(tiny_dev):
    stored = convert(str(tiny_dev), name="dev-mlx")
    man, path = stored.manifest, stored.path
    assert (man.format, man.format_version, man.dtype, man.variant) == (
        "mlx",
        FORMAT_VERSION,
        "bfloat16",
        "dev",
    )
    assert man.source == {"kind": "path", "path": str(tiny_dev.resolve())}
    assert man.quantization is None
    hf = open_folder(tiny_dev)
    assert man.architecture["transformer"] == {
        k: v for k, v in hf.architecture["transformer"].items() if not k.startswith("_") and v is not None
    }
    assert man.files == hash_files(path)  # sizes and sha256 of every file but the manifest
    for rel in (
        "tokenizer/vocab.json",
        "tokenizer_2/spiece.model",
        "model_index.json",
        "scheduler/scheduler_config.json",
    ):
        assert (path / rel).read_bytes() == (tiny_dev / rel).read_bytes()
    for c in COMPONENTS:
        assert (path / c / "model.safetensors.index.json").is_file()
        stored_tensors = TensorSource.from_folder(path / c)
        expected = dict(iter_weights(hf, c, mx.bfloat16, None))
        assert sorted(stored_tensors.keys()) == sorted(expected)
        for k, v in expected.items():
            assert np.array_equal(
                np.array(stored_tensors.load(k).astype(mx.float32)), np.array(v.astype(mx.float32))
            ), k
        # the runtime's own names: a strict load needs no renaming
        build_module(c, man.architecture).load_weights(list(expected.items()), strict=True)


def test_store_model_of_format_hf_converts(tiny_schnell):
    store_hf_folder(tiny_schnell, "schnell")
    stored = convert("schnell", dtype="float32")
    assert stored.name == "schnell-mlx" and stored.manifest.source == {"kind": "model", "name": "schnell"}
    assert stored.manifest.dtype == "float32"
    assert (
        SafetensorsFile(next((stored.path / "transformer").glob("*.safetensors"))).tensors["img_in.weight"][0]
        == "F32"
    )
    assert np.array_equal(image(stored.path), source_image(tiny_schnell))
    assert Store().last_used() == "schnell-mlx"


def _reference_transformer(folder: Path, **kwargs):
    import torch
    from diffusers import FluxTransformer2DModel

    if "pretrained_model_link_or_path_or_dict" in kwargs:
        return FluxTransformer2DModel.from_single_file(**kwargs, torch_dtype=torch.float32)
    return FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)


def _diffusers_forward(model, seed: int = 0):
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 16, 8
    kwargs = dict(
        hidden_states=torch.randn(1, n_img, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(-1, 3),
        txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.tensor([4.0]) if cfg.guidance_embeds else None,
    )
    with torch.no_grad():
        return model(**kwargs).sample


@pytest.fixture
def diffusers_single_file_at_tiny_width(monkeypatch):
    """diffusers' FLUX single-file converter hard-codes the released width (inner_dim = 3072) for the
    single blocks' split; the tiny model is 64 wide, so that one constant is replaced. The mapping
    itself (the splits, the shift/scale swap) stays diffusers' own."""
    from diffusers.loaders import single_file_model

    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    fn = entry["checkpoint_mapping_fn"]
    consts = tuple(64 if type(c) is int and c == 3072 else c for c in fn.__code__.co_consts)
    assert consts != fn.__code__.co_consts
    patched = types.FunctionType(fn.__code__.replace(co_consts=consts), fn.__globals__, fn.__name__)
    monkeypatch.setitem(entry, "checkpoint_mapping_fn", patched)


@pytest.mark.parametrize("variant, prefix", [("dev", ""), ("schnell", COMFY)])
def test_bfl_single_file_matches_its_diffusers_twin(
    variant, prefix, tiny_schnell, tiny_dev, tmp_path, diffusers_single_file_at_tiny_width
):
    import torch

    folder = tiny_schnell if variant == "schnell" else tiny_dev
    twin = write_bfl_twin(folder, tmp_path / f"flux1-{variant}.safetensors", prefix)
    # The twin is checked by diffusers itself, so the test is not circular.
    original = _reference_transformer(folder)
    loaded = _reference_transformer(
        folder, pretrained_model_link_or_path_or_dict=str(twin), config=str(folder), subfolder="transformer"
    )
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_diffusers_forward(original), _diffusers_forward(loaded))

    stored = convert(str(twin), base=str(folder))
    assert stored.name == f"flux1-{variant}-mlx" and stored.manifest.variant == variant
    assert stored.manifest.source["path"] == str(twin.resolve())
    ours, ref = image(stored.path), source_image(folder)
    print(
        f"BFL {variant} (prefix {prefix!r}) vs diffusers folder: max |diff| = {np.abs(ours.astype(int) - ref).max()}"
    )
    assert np.array_equal(ours, ref)


def test_a_relative_base_is_recorded_resolved(tiny_schnell, tmp_path, monkeypatch, mflux_home):
    twin = write_bfl_twin(tiny_schnell, tmp_path / "flux1-schnell.safetensors")
    monkeypatch.chdir(tiny_schnell.parent)
    stored = convert(str(twin), base=f"./{tiny_schnell.name}", progress=False)
    assert stored.manifest.source["base"] == str(tiny_schnell.resolve())


def test_bfl_variant_must_match_the_base(tiny_schnell, tiny_dev, tmp_path, mflux_home):
    twin = write_bfl_twin(tiny_dev, tmp_path / "flux1-dev.safetensors")
    msg = assert_refused(
        mflux_home, ["convert", twin, "--base", tiny_schnell], "dev transformer", "--base dev"
    )
    assert "guidance_in" in msg
    assert_refused(mflux_home, ["convert", twin], "--base dev")


def test_bad_input_is_one_line_and_leaves_the_store_as_it_was(tiny_schnell, tiny_dev, tmp_path, mflux_home):
    store_hf_folder(tiny_schnell, "schnell")
    twin = write_bfl_twin(tiny_schnell, tmp_path / "flux1-schnell.safetensors")
    data = twin.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert_refused(
        mflux_home, ["convert", truncated, "--base", "schnell"], "truncated.safetensors", "truncated"
    )
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 50) + b"{not json" + b"\0" * 64)
    assert_refused(mflux_home, ["convert", garbage, "--base", "schnell"], "not a valid safetensors file")

    vae = tiny_schnell / "vae/diffusion_pytorch_model.safetensors"
    assert_refused(mflux_home, ["convert", vae, "--base", "schnell"], "not a FLUX.1 transformer")

    extra = {"double_blocks.0.img_attn.lora_up.weight": mx.zeros((4, 4)), "some.other.tensor": mx.zeros(2)}
    unmapped = write_bfl_twin(tiny_schnell, tmp_path / "unmapped.safetensors", extra=extra)
    assert_refused(
        mflux_home,
        ["convert", unmapped, "--base", "schnell"],
        "2 tensors",
        "double_blocks.0.img_attn.lora_up.weight",
        "some.other.tensor",
    )
    comfy = {
        "first_stage_model.decoder.conv_in.weight": mx.zeros((4, 4)),
        "cond_stage_model.t5.shared.weight": mx.zeros(2),
    }
    full = write_bfl_twin(tiny_schnell, tmp_path / "full.safetensors", COMFY, extra=comfy)
    assert_refused(
        mflux_home,
        ["convert", full, "--base", "schnell"],
        "first_stage_model.decoder.conv_in.weight",
        "cond_stage_model",
    )

    # Pickle files are refused by name: unpickling this one would create `marker`.
    marker = tmp_path / "marker"
    for suffix in (".ckpt", ".bin", ".pt"):
        evil = tmp_path / f"flux1-schnell{suffix}"
        evil.write_bytes(pickle.dumps(_Touch(str(marker))))
        assert_refused(mflux_home, ["convert", evil, "--base", "schnell"], "pickle")
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_schnell, folder)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    (folder / "transformer/diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Touch(str(marker))))
    assert_refused(mflux_home, ["convert", folder, "--name", "pickled"], "pickle")
    assert not marker.exists()

    # A non-FLUX diffusers folder; and a folder whose VAE breaks after the other components were written.
    assert_refused(mflux_home, ["convert", tiny_schnell / "vae"], "not a FLUX.1 checkpoint")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_schnell, broken)
    vae_file = broken / "vae/diffusion_pytorch_model.safetensors"
    vae_file.write_bytes(vae_file.read_bytes()[:-100])
    assert_refused(mflux_home, ["convert", broken], "truncated")

    assert_refused(mflux_home, ["convert", "schnel"], "unknown model 'schnel'", "schnell")
    assert_refused(mflux_home, ["convert", "schnell", "--name", "schnell", "--force"], "its own source")
    assert_refused(mflux_home, ["convert", "schnell", "--dtype", "int8"], "int8")
    assert_refused(mflux_home, ["convert", "schnell", "--base", "dev"], "--base")


class _Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_existing_name_is_refused_unless_forced(tiny_schnell, mflux_home):
    code, out, _ = invoke("convert", tiny_schnell, "--name", "mine")
    assert code == 0 and "stored mine" in out
    first = Store().get("mine").manifest.created
    assert_refused(mflux_home, ["convert", tiny_schnell, "--name", "mine"], "already exists", "--force")
    code, _, _ = invoke("convert", tiny_schnell, "--name", "mine", "--force", "--dtype", "float32")
    assert code == 0 and Store().get("mine").manifest.dtype == "float32"
    assert Store().get("mine").manifest.created >= first


def test_interrupted_convert_leaves_the_store_as_it_was(tiny_schnell, mflux_home, monkeypatch):
    import mflux.convert

    invoke("convert", tiny_schnell, "--name", "kept")
    before = snapshot(mflux_home)

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mflux.convert, "_copy", interrupt)  # after every component's weights are written
    code, _, err = invoke("convert", tiny_schnell, "--name", "kept", "--force")
    assert code == 130 and err.strip() == "error: interrupted"
    code, _, err = invoke("convert", tiny_schnell, "--name", "other")
    assert code == 130
    assert snapshot(mflux_home) == before
    assert not leftovers(mflux_home)


def test_format_version_is_checked_through_the_loader(tiny_schnell):
    path = convert(str(tiny_schnell), name="versioned").path
    text = (path / MANIFEST).read_text()
    assert f"format_version = {FORMAT_VERSION}\n" in text
    (path / MANIFEST).write_text(text.replace(f"format_version = {FORMAT_VERSION}", "format_version = 99"))
    with pytest.raises(MfluxError, match="newer mflux.*pip install -U mflux"):
        Flux1.from_path(path)
    (path / MANIFEST).write_text(text.replace(f"format_version = {FORMAT_VERSION}", "format_version = 0"))
    with pytest.raises(MfluxError, match="format 0 is not supported"):
        open_folder(path)


def test_cli_convert_end_to_end(tiny_schnell, tiny_dev, tmp_path, mflux_home):
    store_hf_folder(tiny_dev, "dev")
    code, out, err = invoke("convert", "dev")
    assert code == 0, err
    assert "stored dev-mlx" in out
    twin = write_bfl_twin(tiny_dev, tmp_path / "flux1-dev.safetensors", COMFY)
    code, out, err = invoke("convert", twin, "--base", "dev", "--name", "dev-bfl", "--dtype", "float16")
    assert code == 0, err
    assert "kept in bfloat16" in err and "float16 overflows in T5" in err
    man = Store().get("dev-bfl").manifest
    assert man.dtype == "float16" and man.architecture["text_encoder_2"]["dtype"] == "bfloat16"
    assert man.source.items() >= {"kind": "path", "path": str(twin.resolve()), "base": "dev"}.items()
    assert (
        man.source["format"]
        == "safetensors bfloat16, BFL names, transformer only, prefix model.diffusion_model."
    )
    t5 = TensorSource.from_folder(Store().path("dev-bfl") / "text_encoder_2")
    assert {t5.dtype(k) for k in t5.keys()} == {"BF16"}
    code, out, _ = invoke("list")
    assert code == 0 and "dev-mlx" in out and "dev-bfl" in out
    assert np.array_equal(image(Store().path("dev-mlx")), source_image(tiny_dev))
    assert image(Store().path("dev-bfl")).std() > 10  # float16 weights: it runs, not bit-equal to bf16


# --- streaming: peak memory stays far below the checkpoint's size ---------------------------------

_CHILD = """
import sys
import mflux.convert as c
c.MAX_SHARD_BYTES = int(sys.argv[1])
if sys.argv[2] == "convert":
    c.convert(sys.argv[3], base=sys.argv[4], name=sys.argv[5])
else:
    c.quantize(sys.argv[3], bits=4, name=sys.argv[5])
"""
# Linux carries a process's peak RSS across fork and exec, so a child of pytest would start at
# pytest's peak. A fresh, small interpreter launches the measured child and reads RUSAGE_CHILDREN.
_LAUNCHER = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], check=True)
print("peak_kib", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def bfl_shapes(hidden: int, depth: int, single: int, context: int = 64, pooled: int = 64) -> dict:
    """Black Forest Labs names and shapes of a FLUX.1 schnell transformer of the given sizes."""
    h, s = hidden, {}
    for name, shape in [("img_in", (h, 64)), ("txt_in", (h, context)), ("final_layer.linear", (64, h))]:
        s[f"{name}.weight"], s[f"{name}.bias"] = shape, shape[:1]
    for e, width in (("time_in", 256), ("vector_in", pooled)):
        for layer, shape in (("in_layer", (h, width)), ("out_layer", (h, h))):
            s[f"{e}.{layer}.weight"], s[f"{e}.{layer}.bias"] = shape, shape[:1]
    linears = [
        ("_mod.lin", 6 * h, h),
        ("_attn.qkv", 3 * h, h),
        ("_attn.proj", h, h),
        ("_mlp.0", 4 * h, h),
        ("_mlp.2", h, 4 * h),
    ]
    for i in range(depth):
        for side in ("img", "txt"):
            for name, out, inp in linears:
                s[f"double_blocks.{i}.{side}{name}.weight"], s[f"double_blocks.{i}.{side}{name}.bias"] = (
                    (out, inp),
                    (out,),
                )
            for norm in ("query_norm", "key_norm"):
                s[f"double_blocks.{i}.{side}_attn.norm.{norm}.scale"] = (128,)
    for i in range(single):
        for name, out, inp in (("linear1", 7 * h, h), ("linear2", h, 5 * h), ("modulation.lin", 3 * h, h)):
            s[f"single_blocks.{i}.{name}.weight"], s[f"single_blocks.{i}.{name}.bias"] = (out, inp), (out,)
        for norm in ("query_norm", "key_norm"):
            s[f"single_blocks.{i}.norm.{norm}.scale"] = (128,)
    s["final_layer.adaLN_modulation.1.weight"], s["final_layer.adaLN_modulation.1.bias"] = (
        (2 * h, h),
        (2 * h,),
    )
    return s


def write_random_checkpoint(path: Path, shapes: dict, dtype: str = "BF16", pool=None) -> int:
    """A safetensors file of random weights, written one tensor at a time; returns its size. `pool`
    holds the values' bits in `dtype` (default: bf16 normals)."""
    if pool is None:
        rng = np.random.default_rng(0)
        pool = (rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).view(np.uint32) >> 16  # bf16 bits
        pool = pool.astype(np.uint16)
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = int(np.prod(shape)) * pool.itemsize
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for i, shape in enumerate(shapes.values()):
            f.write(np.resize(np.roll(pool, i * 7919), int(np.prod(shape))).tobytes())
    return path.stat().st_size


def peak_kib(*args) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, _CHILD, *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split("peak_kib")[-1])


def test_streaming_keeps_peak_memory_far_below_the_checkpoint(tiny_schnell, tmp_path):
    # Peak memory is about one output shard plus a few tensors. The real models write 1 GiB shards
    # against a 24 GB transformer; this test keeps that proportion with 16 MiB shards against 0.4 GB.
    shard = 16 * 2**20
    small = tmp_path / "small.safetensors"
    big = tmp_path / "big.safetensors"
    write_random_checkpoint(small, bfl_shapes(hidden=128, depth=1, single=1))
    size = write_random_checkpoint(big, bfl_shapes(hidden=1024, depth=3, single=6))
    assert size > 400e6
    results = {}
    for what in ("small", "big"):
        results[f"convert {what}"] = peak_kib(
            shard, "convert", tmp_path / f"{what}.safetensors", tiny_schnell, what
        )
        results[f"quantize {what}"] = peak_kib(shard, "quantize", what, "-", f"{what}-q4")
    mib = {k: v / 1024 for k, v in results.items()}
    print(
        f"checkpoint {size / 2**20:.0f} MiB; peak RSS (MiB): "
        + ", ".join(f"{k} {v:.0f}" for k, v in mib.items())
    )
    for op in ("convert", "quantize"):
        grown = mib[f"{op} big"] - mib[f"{op} small"]  # the baseline: the same command on a tiny checkpoint
        assert grown < 0.5 * size / 2**20, (
            f"{op}: peak grew by {grown:.0f} MiB on a {size / 2**20:.0f} MiB checkpoint"
        )
    stored = Store().get("big-q4")
    assert stored.manifest.quantization["transformer"]["bits"] == 4
    assert stored.size_bytes < 0.35 * size
