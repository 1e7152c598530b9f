"""`mflux convert FILE` on the single files people share (fp8, scaled fp8, fp16, fp32, bf16; BFL, ComfyUI
or diffusers names; transformer only or all-in-one), and `mflux import FOLDER`.

The files are written here from the tiny random FLUX.1 with torch's own float8 casts, so the reference
dequantization (`w.float()`, `w.float() * scale_weight`) is torch's, not ours."""

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mflux.convert import convert
from mflux.converters import diffusers
from mflux.errors import MfluxError
from mflux.folders import open_folder
from mflux.inspector import inspect
from mflux.runtime.weights import TensorSource
from mflux.store import Store
from tests.fixtures import packed_latents, reference_image, store_hf_folder
from tests.test_convert import (
    COMFY,
    assert_refused,
    bfl_shapes,
    image,
    invoke,
    peak_kib,
    write_random_checkpoint,
)

PROMPT = "Luxury food photograph"
SIZE = 32
CLIP = "text_encoders.clip_l.transformer."
T5 = "text_encoders.t5xxl.transformer."
FP8 = ("e4m3", "e5m2")


def torch_tensors(folder: Path, component: str) -> dict:
    """A diffusers folder component's tensors, float32 torch."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        out.update({k: v.to(torch.float32) for k, v in load_file(f).items()})
    return out


def to_bfl(tensors: dict) -> dict:
    """diffusers-named transformer tensors in Black Forest Labs' names (mflux's own sanitize; the BFL
    single-file test in test_convert.py checks it against diffusers' loader)."""
    import torch

    fused = diffusers.sanitize_transformer({k: mx.array(v.numpy()) for k, v in tensors.items()})
    return {k: torch.from_numpy(np.array(v)) for k, v in fused.items()}


def encode(tensors: dict, kind: str) -> tuple[dict, dict]:
    """(what the file stores, the float32 reference). fp8 kinds store the 2-D weights in float8 and the
    rest in bf16, as the shared files do; `-scaled` adds a per-layer scale_weight."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    fp8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    base, scaled = kind.removesuffix("-scaled"), kind.endswith("-scaled")
    stored, ref = {}, {}
    for k, t in tensors.items():
        if base not in fp8 or t.ndim < 2:
            stored[k] = t.to(dtypes.get(base, torch.bfloat16))
            ref[k] = stored[k].float()
        elif scaled:
            scale = (t.abs().max() / 448).float()
            stored[k], stored[k.removesuffix(".weight") + ".scale_weight"] = (t / scale).to(fp8[base]), scale
            ref[k] = stored[k].float() * scale
        else:
            stored[k] = t.to(fp8[base])
            ref[k] = stored[k].float()
    if scaled:
        stored["scaled_fp8"] = torch.empty(0, dtype=fp8[base])
    return stored, ref


def save(path: Path, parts: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in parts.items()}, str(path))
    return path


def prefixed(prefix: str, tensors: dict) -> dict:
    return {prefix + k: v for k, v in tensors.items()}


def stored_tensors(path: Path, component: str) -> dict:
    source = TensorSource.from_folder(path / component)
    return {k: np.array(source.load(k).astype(mx.float32)) for k in source.keys()}


def runtime_names(component: str, ref: dict, names: str) -> dict:
    """The reference under the runtime's names, float32 numpy."""
    arrays = {k: mx.array(v.numpy()) for k, v in ref.items()}
    if component == "transformer" and names == "diffusers":
        arrays = diffusers.sanitize_transformer(arrays)
    elif component != "transformer":
        arrays = diffusers.sanitize(component, arrays)
    return {k: np.array(v) for k, v in arrays.items()}


def bf16(ref: dict) -> dict:
    import torch

    return {k: v.to(torch.bfloat16).float() for k, v in ref.items()}


@pytest.mark.parametrize(
    "kind, names",
    [
        ("bf16", "bfl"),
        ("fp16", "diffusers"),
        ("fp32", "comfy"),
        ("e4m3", "comfy"),
        ("e5m2", "bfl"),
        ("e4m3-scaled", "comfy"),
        ("e5m2-scaled", "diffusers"),
    ],
)
def test_stored_weights_are_the_exact_dequantization(kind, names, tiny_schnell, tmp_path):
    weights = torch_tensors(tiny_schnell, "transformer")
    if names != "diffusers":
        weights = to_bfl(weights)
    stored, ref = encode(weights, kind)
    path = save(tmp_path / "model.safetensors", prefixed(COMFY if names == "comfy" else "", stored))
    layout = "diffusers" if names == "diffusers" else "bfl"

    exact = convert(str(path), base=str(tiny_schnell), dtype="float32", name="exact", progress=False)
    rounded = convert(str(path), base=str(tiny_schnell), name="rounded", progress=False)
    for model, expected in ((exact, ref), (rounded, bf16(ref))):
        got, want = stored_tensors(model.path, "transformer"), runtime_names("transformer", expected, layout)
        assert got.keys() == want.keys()
        for k in want:
            assert np.array_equal(got[k], want[k]), (kind, names, k)
    source = exact.manifest.source
    assert ("float8" in source["format"]) == (kind in FP8 or kind.endswith("-scaled"))
    assert ("(scaled)" in source["format"]) == kind.endswith("-scaled")
    types = source["tensor_types"]["transformer"]
    assert types["img_in.bias"] in ("BF16", "F16", "F32")
    if kind.endswith("-scaled"):
        assert types["double_blocks.0.img_attn.qkv.weight"] == f"F8_{kind[:4].upper()} scaled"


def ldm_vae(tensors: dict) -> dict:
    """diffusers' VAE tensors in BFL's `ae` names, attention as 1x1 convolutions (checked against
    diffusers' own convert_ldm_vae_checkpoint in the test)."""
    up = 1 + max(int(m[1]) for k in tensors if (m := re.match(r"decoder\.up_blocks\.(\d+)", k)))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, t in tensors.items():
        name = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", name)
        name = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{up - 1 - int(m[1])}.", name)
        name = re.sub(r"(up\.\d+)\.resnets\.", r"\1.block.", name)
        name = name.replace(".upsamplers.0.", ".upsample.").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
        if "mid_block.attentions.0." in name:
            leaf = re.search(r"attentions\.0\.(.+)\.(weight|bias)$", name)
            name = f"{name.split('.')[0]}.mid.attn_1.{attention[leaf[1]]}.{leaf[2]}"
            t = t[:, :, None, None] if t.ndim == 2 else t
        out[name.replace("conv_norm_out", "norm_out")] = t
    return out


def test_all_in_one_fp8_file_gives_diffusers_image(tiny_schnell, tmp_path):
    """A ComfyUI all-in-one checkpoint (scaled fp8 transformer, fp16 CLIP, fp8 T5, a VAE in BFL's names)
    gives the image diffusers gives from a folder holding the same float32 weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import save_file

    vae = torch_tensors(tiny_schnell, "vae")
    ldm = ldm_vae(vae)
    config = {"down_block_types": [0] * 4, "up_block_types": [0] * 4}
    back = convert_ldm_vae_checkpoint(ldm, config)
    assert back.keys() == vae.keys() and all(np.array_equal(back[k], vae[k]) for k in vae)

    # Weights unlike the base's, so a component taken from the base would show in the image.
    parts = {
        "transformer": (COMFY, to_bfl(torch_tensors(tiny_schnell, "transformer")), "e4m3-scaled"),
        "text_encoder": (
            CLIP,
            {k: v * 1.05 for k, v in torch_tensors(tiny_schnell, "text_encoder").items()},
            "fp16",
        ),
        "text_encoder_2": (
            T5,
            {k: v * 0.95 for k, v in torch_tensors(tiny_schnell, "text_encoder_2").items()},
            "e4m3",
        ),
        "vae": ("vae.", {k: v * 1.02 for k, v in ldm.items()}, "bf16"),
    }
    file, refs = {}, {}
    for c, (prefix, tensors, kind) in parts.items():
        stored, refs[c] = encode(tensors, kind)
        file.update(prefixed(prefix, stored))
    path = save(tmp_path / "flux1-schnell-aio.safetensors", file)

    # The reference: a diffusers folder (the base's tokenizers and configs) holding the same float32 weights.
    folder = tmp_path / "reference"
    shutil.copytree(tiny_schnell, folder)
    as_diffusers = {
        "transformer": diffusers.transformer_to_diffusers(
            {k: mx.array(v.numpy()) for k, v in refs["transformer"].items()}
        ),
        "text_encoder": refs["text_encoder"],
        "text_encoder_2": refs["text_encoder_2"],
        "vae": convert_ldm_vae_checkpoint(refs["vae"], config),
    }
    for c, tensors in as_diffusers.items():
        for f in (folder / c).glob("*.safetensors*"):
            f.unlink()
        tensors = {k: _torch(v) for k, v in tensors.items()}
        name = "model.safetensors" if c.startswith("text") else "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / c / name))

    stored = convert(str(path), base=str(tiny_schnell), dtype="float32", progress=False)
    assert stored.manifest.source["format"].endswith("all-in-one")
    assert set(stored.manifest.source["tensor_types"]) == set(parts)
    latents = packed_latents(3, SIZE, SIZE)
    ref = reference_image(folder, PROMPT, height=SIZE, width=SIZE, steps=2, latents=latents)
    ours = image(stored.path)
    diff = np.abs(ours.astype(int) - ref).max()
    print(f"all-in-one fp8 vs diffusers folder: max |diff| = {diff}")
    assert ref.std() > 10 and diff <= 2
    # and not the base's image: the file's encoders and VAE were used
    assert np.abs(ours.astype(int) - image(tiny_schnell)).max() > 2


def _torch(v):
    import torch

    return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))


def test_bits_quantizes_an_fp8_file_straight_to_affine(tiny_schnell, tmp_path):
    stored, ref = encode(to_bfl(torch_tensors(tiny_schnell, "transformer")), "e4m3")
    path = save(tmp_path / "flux1-schnell-fp8.safetensors", prefixed(COMFY, stored))
    code, out, err = invoke("convert", path, "--base", tiny_schnell, "--bits", "8")
    assert code == 0, err
    model = Store().get("flux1-schnell-fp8-q8")
    assert model.manifest.quantization["transformer"] == {"bits": 8, "group_size": 64, "mode": "affine"}
    source = TensorSource.from_folder(model.path / "transformer")
    w = mx.array(bf16(ref)["double_blocks.0.img_attn.qkv.weight"].numpy()).astype(mx.bfloat16)
    q, scales, biases = mx.quantize(w, group_size=64, bits=8)
    name = "double_blocks.0.img_attn.qkv"
    for leaf, want in (("weight", q), ("scales", scales), ("biases", biases)):
        got = source.load(f"{name}.{leaf}")
        assert got.dtype == want.dtype and mx.array_equal(got, want).item(), leaf


def test_bad_files_are_one_line_before_anything_is_written(tiny_schnell, tmp_path, mflux_home):
    import torch

    weights = to_bfl(torch_tensors(tiny_schnell, "transformer"))
    stored, _ = encode(weights, "e4m3-scaled")
    good = save(tmp_path / "good.safetensors", prefixed(COMFY, stored))

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    assert_refused(mflux_home, ["convert", cut, "--base", tiny_schnell], "cut.safetensors", "truncated")

    stray = {
        **prefixed(COMFY, stored),
        **prefixed(CLIP, {"x.weight": torch.zeros(2)}),
        "lora_te_x.alpha": torch.zeros(1),
    }
    path = save(tmp_path / "stray.safetensors", stray)
    assert_refused(
        mflux_home, ["convert", path, "--base", tiny_schnell], "fit no known layout", "lora_te_x.alpha"
    )

    ints = save(
        tmp_path / "ints.safetensors", {**stored, "img_in.weight": torch.zeros(64, 64, dtype=torch.int8)}
    )
    assert_refused(mflux_home, ["convert", ints, "--base", tiny_schnell], "tensor type I8", "img_in.weight")

    path = save(tmp_path / "orphan.safetensors", {**stored, "nothing.scale_weight": torch.ones(())})
    assert_refused(mflux_home, ["convert", path, "--base", tiny_schnell], "nothing.scale_weight")

    # No base and no catalog model in the store: refused from the header, before any weight is read.
    assert_refused(mflux_home, ["convert", good], "--base schnell")

    # An all-in-one file whose T5 does not fit the base's config.
    t5 = {"shared.weight": torch.zeros(7, 3)}
    path = save(tmp_path / "aio.safetensors", {**prefixed(COMFY, stored), **prefixed(T5, t5)})
    assert_refused(mflux_home, ["convert", path, "--base", tiny_schnell], "text_encoder_2", "shared.weight")


def write_random_fp8(path: Path, shapes: dict) -> int:
    """An F8_E4M3 safetensors file of random finite weights (norms' scales too)."""
    pool = np.random.default_rng(0).integers(0, 0x70, 1 << 20, dtype=np.uint8)  # below 0x7f: no NaN
    pool[::2] |= 0x80  # either sign
    return write_random_checkpoint(path, shapes, "F8_E4M3", pool)


def test_fp8_convert_streams_one_tensor_at_a_time(tiny_schnell, tmp_path):
    # Two files of one width, one with many more blocks: streaming holds one tensor (its float32
    # dequantization) and one output shard, so the peak does not grow with the file. Reading the file
    # whole would grow it by the file's size, and dequantizing it whole by four times that.
    small, big = tmp_path / "small.safetensors", tmp_path / "big.safetensors"
    write_random_fp8(small, bfl_shapes(hidden=1024, depth=1, single=1))
    size = write_random_fp8(big, bfl_shapes(hidden=1024, depth=2, single=7)) - small.stat().st_size
    peaks = {
        w: peak_kib(16 * 2**20, "convert", tmp_path / f"{w}.safetensors", tiny_schnell, w) / 1024
        for w in ("small", "big")
    }
    grown = peaks["big"] - peaks["small"]
    print(f"fp8 file {size / 2**20:.0f} MiB larger: peak RSS grew {grown:.0f} MiB")
    assert grown < 0.25 * size / 2**20
    assert Store().get("big").manifest.source["format"].startswith("safetensors float8_e4m3fn")


# --- mflux import ------------------------------------------------------------------------------------


def hf_cache_snapshot(folder: Path, cache: Path) -> Path:
    """`folder` as the Hugging Face cache keeps a download: each file a blob named by its sha256 in
    `blobs/`, the snapshot a tree of relative symlinks to them."""
    repo = cache / "models--black-forest-labs--FLUX.1-schnell"
    snapshot = repo / "snapshots" / ("ab" * 20)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_import_of_a_hf_cache_snapshot_keeps_one_copy_and_rm_keeps_the_original(tiny_schnell, tmp_path):
    snapshot = hf_cache_snapshot(tiny_schnell, tmp_path / "hub")
    blobs = {p.relative_to(snapshot).as_posix(): p.resolve() for p in snapshot.rglob("*") if p.is_symlink()}
    # a root single file, as a full snapshot_download has it: not part of the pipeline, left out
    (snapshot / "flux1-schnell.safetensors").symlink_to(snapshot / "vae/diffusion_pytorch_model.safetensors")
    code, out, err = invoke("import", snapshot)
    assert code == 0, err
    stored = Store().get("schnell")  # the catalog's name for the repo
    man = stored.manifest
    assert (man.format, man.variant) == ("hf", "schnell")
    assert {f["path"]: f["sha256"] for f in man.files} == {rel: b.name for rel, b in blobs.items()}
    # one copy of each file on disk: the store's file is the blob itself (a clone shares its blocks)
    print(out.strip())
    assert man.source["imported"] in ("hardlink", "clone")
    for rel, blob in blobs.items():
        mine, theirs = (stored.path / rel).stat(), blob.stat()
        assert not (stored.path / rel).is_symlink()
        if man.source["imported"] == "hardlink":
            assert (mine.st_ino, mine.st_nlink) == (theirs.st_ino, 2), rel
    assert np.array_equal(image(stored.path), image(tiny_schnell))

    # Edited in place through the original (same size, newer mtime): the stored model is refused.
    vae = blobs["vae/diffusion_pytorch_model.safetensors"]
    original = vae.read_bytes()
    with open(vae, "r+b") as f:
        f.seek(len(original) - 4)
        f.write(b"\x01\x02\x03\x04")
    later = time.time() + 60
    os.utime(vae, (later, later))
    if man.source["imported"] == "hardlink":
        with pytest.raises(MfluxError, match="schnell is damaged: vae/diffusion_pytorch_model.safetensors"):
            open_folder(stored.path)
    vae.write_bytes(original)

    code, out, err = invoke("rm", "-y", "schnell")
    assert code == 0, err
    assert not stored.path.exists()
    for rel, blob in blobs.items():  # every original still there, whole, and reached by its link
        assert blob.is_file() and blob.stat().st_nlink == 1
        assert hashlib.sha256((snapshot / rel).read_bytes()).hexdigest() == blob.name


def test_import_copy_never_links_and_bad_folders_are_refused(tiny_schnell, tmp_path, mflux_home):
    code, out, err = invoke("import", tiny_schnell, "--copy", "--name", "copied")
    assert code == 0, err
    stored = Store().get("copied")
    assert stored.manifest.source["imported"] in ("copy", "clone")
    for f in stored.manifest.files:
        assert (stored.path / f["path"]).stat().st_ino != (tiny_schnell / f["path"]).stat().st_ino

    assert_refused(mflux_home, ["import", tiny_schnell / "vae"], "not a FLUX.1 checkpoint")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_schnell, broken)
    (broken / "tokenizer/vocab.json").unlink()
    (broken / "tokenizer/vocab.json").symlink_to("../../blobs/gone")
    assert_refused(mflux_home, ["import", broken], "vocab.json", "broken symlink")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_schnell, cut)
    shard = next((cut / "transformer").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_refused(mflux_home, ["import", cut], "truncated")


def test_inspect_reads_an_fp8_file_as_convert_would(tiny_schnell, tmp_path):
    stored, _ = encode(to_bfl(torch_tensors(tiny_schnell, "transformer")), "e5m2-scaled")
    path = save(tmp_path / "flux1-schnell-fp8.safetensors", prefixed(COMFY, stored))
    report = inspect(str(path))
    assert report["format"] == (
        "safetensors float8_e5m2+bfloat16+float32 (scaled), BFL names, transformer only, prefix "
        "model.diffusion_model."
    )
    assert report["variant"] == "schnell"
    assert set(report["components"][path.name]["dtypes"]) == {"float8_e5m2", "bfloat16", "float32"}


def test_import_of_an_mlx_folder_checks_it_against_its_own_manifest(tiny_schnell, tmp_path, mflux_home):
    made = convert(str(tiny_schnell), name="made", bits=8, progress=False)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(made.path, elsewhere)  # copy2: the files keep their times
    code, out, err = invoke("import", elsewhere, "--name", "imported")
    assert code == 0, err
    imported = Store().get("imported").manifest
    assert (imported.format, imported.quantization) == ("mlx", made.manifest.quantization)
    assert imported.files == made.manifest.files and imported.source["path"] == str(elsewhere)
    assert np.array_equal(image(Store().path("imported")), image(made.path))

    # A byte changed in place, size and times kept: only the sha256 tells, and import checks it.
    shard = next((elsewhere / "vae").glob("*.safetensors"))
    st, data = shard.stat(), bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    msg = assert_refused(
        mflux_home, ["import", elsewhere, "--name", "again"], "does not match its manifest's sha256"
    )
    assert shard.relative_to(elsewhere).as_posix() in msg


def test_without_base_the_stored_catalog_model_gives_tokenizers_and_configs(tiny_schnell, tmp_path):
    store_hf_folder(tiny_schnell, "schnell")
    stored, _ = encode(to_bfl(torch_tensors(tiny_schnell, "transformer")), "bf16")
    path = save(tmp_path / "flux1-schnell.safetensors", stored)
    code, out, err = invoke("convert", path)
    assert code == 0, err
    assert "from schnell (the stored catalog model)" in out
    model = Store().get("flux1-schnell-mlx")
    assert model.manifest.source["base"] == "schnell"
    code, out, err = invoke("inspect", "flux1-schnell-mlx")
    assert f"path {path} (safetensors bfloat16, BFL names, transformer only; base schnell)" in out, out
    assert (model.path / "tokenizer_2/spiece.model").read_bytes() == (
        tiny_schnell / "tokenizer_2/spiece.model"
    ).read_bytes()
