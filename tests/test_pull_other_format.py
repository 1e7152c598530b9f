"""`mflux pull` of FLUX.1 models saved by the other MLX port (PyPI `mflux` 0.x): converted at pull time.

The fixtures (tests/othermflux_files.py) are that port's saved layout, built from a tiny diffusers
pipeline; their names, shards and metadata are first checked against what its own 0.24.0 saver writes
for a full-size FLUX.1 (tests/othermflux_layout.json.gz, made by tests/record_othermflux_layout.py).
"""

import gzip
import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mflux import Config, Flux1, hub
from mflux import othermflux as pull_side
from mflux.converters import diffusers, othermflux
from mflux.errors import MfluxError
from mflux.inspector import format_inspect, inspect
from mflux.manifest import read_manifest
from tests.fixtures import build_tiny_pipeline, packed_latents, reference_image
from tests.hub_server import HubServer, point_client_at
from tests.othermflux_files import build_other_save, dequantized, diffusers_reference

LAYOUT = Path(__file__).parent / "othermflux_layout.json.gz"
PROMPT = "Luxury food photograph"
BOUND = 2  # /255 at float32, the bound


def mixed_bits(component: str, name: str) -> int | None:
    # As a community mixed save: 8 bits for the modulations and for q (not k, v) in the attention,
    # which leaves a fused q/k/v of mixed widths.
    return 8 if ".norm1.linear." in name or ".attn.to_q." in name else None


SAVES = {
    "q4": dict(bits=4),
    "q8": dict(bits=8),
    "mixed": dict(bits=4, bits_for=mixed_bits),
    "bf16": dict(bits=None),  # saved without -q
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # CLIP-L's heads are 64 wide, which that port hard-codes and mflux assumes where no weight tells.
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "FLUX.1-schnell", "schnell", clip_heads=1)


@pytest.fixture(scope="module")
def saves(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saves")
    # A small shard size, so the transformer spans several numbered shards as the real one does.
    return {k: build_other_save(tiny, root / k, max_shard_bytes=200_000, **v) for k, v in SAVES.items()}


@pytest.fixture(scope="module")
def server(saves):
    with HubServer() as s:
        for key, folder in saves.items():
            s.add_repo(f"someone/flux-schnell-mflux-{key}", folder)
        yield s


@pytest.fixture(autouse=True)
def hub_env(server, monkeypatch, tmp_path):
    point_client_at(server, monkeypatch, tmp_path)
    server.requests.clear()


def recorded() -> dict:
    return json.loads(gzip.decompress(LAYOUT.read_bytes()))


def pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def test_fixture_layout_is_the_other_savers(saves):
    """Same component folders, numbered shards with the index, metadata, and tensor names (block
    numbers aside) as the other port's own saver writes."""
    real = recorded()["schnell-q4"]
    save = saves["q4"]
    assert sorted(p.name for p in save.iterdir() if (p / "0.safetensors").exists()) == sorted(real)
    for component, entry in real.items():
        files = sorted(p.name for p in (save / component).iterdir())
        assert all(re.fullmatch(r"\d+\.safetensors", f) for f in entry["files"])
        assert set(files) >= {"0.safetensors", "model.safetensors.index.json"}
        for f in files[:-1]:
            assert mx.load(str(save / component / f), return_metadata=True)[1] == {
                "quantization_level": "4",
                "mflux_version": "0.24.0",
            }
        ours = {}
        for f in (save / component).glob("*.safetensors"):
            ours.update(mx.load(str(f)))
        # The tiny T5's relative bias is 2 heads wide, too narrow to quantize at group size 64.
        bias = "t5_blocks.N.attention.SelfAttention.relative_attention_bias"
        assert {pattern(k) for k in ours} == {pattern(k) for k in entry["tensors"]} - {
            f"{bias}.scales",
            f"{bias}.biases",
        }, component
        packed = {pattern(k) for k, (dtype, _) in entry["tensors"].items() if dtype == "uint32"}
        assert {pattern(k) for k, v in ours.items() if v.dtype == mx.uint32} == packed - {f"{bias}.weight"}


@pytest.mark.parametrize("key, variant", [("schnell-q4", "schnell"), ("dev-q8", "dev")])
def test_full_size_layout_converts_to_flux1(key, variant):
    """The other saver's full-size names and shapes (lazy zeros, nothing computed) convert to the
    runtime's names for FLUX.1's real sizes, every module found."""
    layout = recorded()[key]
    shapes = {}
    sanitized = {}
    for component, entry in layout.items():
        lazy = {k: mx.zeros(shape, getattr(mx, dtype)) for k, (dtype, shape) in entry["tensors"].items()}
        sanitized[component] = othermflux.sanitize(component, lazy)
        shapes[component] = othermflux.logical_shapes(sanitized[component])
    arch = pull_side.architecture(shapes)
    assert arch["transformer"] == {
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": variant == "dev",
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    }
    t5 = {
        k: arch["text_encoder_2"][k]
        for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    }
    assert t5 == {
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
    }
    clip = arch["text_encoder"]
    assert (clip["hidden_size"], clip["num_attention_heads"], clip["num_hidden_layers"]) == (768, 12, 12)
    assert (clip["vocab_size"], clip["intermediate_size"], clip["max_position_embeddings"]) == (
        49408,
        3072,
        77,
    )
    assert arch["vae"]["block_out_channels"] == [128, 256, 512, 512]
    assert (arch["vae"]["latent_channels"], arch["vae"]["layers_per_block"]) == (16, 2)
    bits = int(key[-1])
    for component, weights in sanitized.items():
        _, layers = pull_side.prepare(component, weights, arch, component)  # the key-set check passes
        if component == "vae":
            assert layers == {}  # its quantized attention is dequantized: the VAE stays float
        else:
            assert set(layers.values()) == {bits}


def test_unquantized_save_pulls(saves):
    model = hub.pull("someone/flux-schnell-mflux-bf16", progress=False)
    m = read_manifest(model.path)
    assert (m.format, m.dtype, m.quantization) == ("mlx", "bfloat16", None)
    assert "quantization_level" not in m.source
    source_line = next(
        line for line in format_inspect(inspect(m.name)).splitlines() if line.startswith("source")
    )
    assert source_line.endswith("(format mflux-saved, converted at pull)")
    stored = _stored_weights(model.path)
    for component in stored:
        ours = _as_diffusers(component, stored[component], None)
        theirs = dequantized(saves["bf16"], component)
        assert sorted(ours) == sorted(theirs)
        assert all(np.array_equal(ours[k], v) for k, v in theirs.items()), component


@pytest.mark.parametrize("key", ["q4", "q8", "mixed"])
def test_pull_converts_without_dequantizing(key, saves):
    model = hub.pull(f"someone/flux-schnell-mflux-{key}", progress=False)
    m = read_manifest(model.path)
    assert (m.format, m.variant, m.source["format"]) == ("mlx", "schnell", "mflux-saved")
    bits = SAVES[key]["bits"]
    assert m.source["repo"] == f"someone/flux-schnell-mflux-{key}"
    assert m.source["quantization_level"] == str(bits)  # its metadata
    assert set(m.quantization) == {"transformer", "text_encoder", "text_encoder_2"}  # the VAE stays float
    assert m.quantization["transformer"]["bits"] == bits
    assert m.quantization["transformer"]["group_size"] == 64
    if key == "mixed":
        overrides = m.quantization["transformer"]["layers"]
        assert overrides and all(v == {"bits": 8} for v in overrides.values())
        assert all(p.endswith("_mod.lin") for p in overrides)  # the modulations; q/k/v went float
    stored = _stored_weights(model.path)
    assert "double_blocks.0.txt_attn.qkv.scales" in stored["transformer"]  # fused from packed rows
    # a q/k/v whose parts differ in bits is dequantized (exactly) into one float matrix
    assert ("double_blocks.0.img_attn.qkv.scales" in stored["transformer"]) == (key != "mixed")
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        ours = _as_diffusers(component, stored[component], m.quantization.get(component))
        theirs = dequantized(saves[key], component)
        assert sorted(ours) == sorted(theirs), component
        for name, ref in theirs.items():
            assert np.array_equal(ours[name], ref), f"{component} {name}"


@pytest.mark.parametrize("key", ["q4", "mixed"])
def test_image_equals_diffusers_with_the_dequantized_weights(key, saves, tiny, tmp_path):
    model = hub.pull(f"someone/flux-schnell-mflux-{key}", progress=False)
    reference = diffusers_reference(saves[key], tiny, tmp_path / "reference")
    latents = packed_latents(seed=3, height=64, width=64)
    ref = reference_image(reference, PROMPT, height=64, width=64, steps=2, latents=latents)
    flux = Flux1.from_path(model.path, precision="float32")
    config = Config(num_inference_steps=2, height=64, width=64)
    ours = np.array(flux.generate_image(seed=0, prompt=PROMPT, config=config, latents=latents).image)
    assert ref.std() > 10  # not a flat image
    diff = int(np.abs(ours.astype(int) - ref.astype(int)).max())
    print(f"{key}: max |diff| = {diff}/255")
    assert diff <= BOUND


def test_second_pull_is_up_to_date(server):
    first = hub.pull("someone/flux-schnell-mflux-q8", progress=False)
    server.requests.clear()
    again = hub.pull("someone/flux-schnell-mflux-q8", progress=False)
    assert again.path == first.path and not [r for r in server.requests if "/resolve/" in r["path"]]


def test_space_for_the_download_and_its_conversion(server, saves, monkeypatch, mflux_home):
    # Room for the download alone is not enough: the converted copy is written before it goes.
    size = sum(p.stat().st_size for p in saves["q8"].rglob("*") if p.is_file() and "index" not in p.name)
    free = int(size * 1.5)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free)
    )
    with pytest.raises(MfluxError, match="not enough disk space to pull flux-schnell-mflux-q8"):
        hub.pull("someone/flux-schnell-mflux-q8", progress=False)
    assert not [r for r in server.requests if "/resolve/" in r["path"]]


def test_incomplete_save_is_refused_before_downloading(saves, server, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saves["q4"], broken, ignore=shutil.ignore_patterns("vae"))
    server.add_repo("someone/flux-no-vae", broken)
    with pytest.raises(MfluxError, match=r"lacks vae/0\.safetensors"):
        hub.pull("someone/flux-no-vae", progress=False)
    assert not [r for r in server.requests if "/resolve/" in r["path"]]


def _stored_weights(folder: Path) -> dict[str, dict]:
    out = {}
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        out[component] = {}
        for f in sorted((folder / component).glob("*.safetensors")):
            out[component].update(mx.load(str(f)))
    return out


def _as_diffusers(component: str, weights: dict, quantization: dict | None) -> dict[str, np.ndarray]:
    """The stored (runtime-named) weights dequantized as the loaded model holds them, in diffusers' names."""
    floats = {}
    for name, arr in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{path}.weight" in weights:
            continue
        if leaf == "weight" and f"{path}.scales" in weights:
            spec = {**quantization, **quantization.get("layers", {}).get(path, {})}
            arr = mx.dequantize(
                arr, weights[f"{path}.scales"], weights[f"{path}.biases"], group_size=64, bits=spec["bits"]
            )
        floats[name] = arr
    if component == "transformer":
        floats = diffusers.transformer_to_diffusers(floats)
    if component == "vae":
        floats = {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in floats.items()}
    return {k: np.array(v.astype(mx.float32)) for k, v in floats.items()}
