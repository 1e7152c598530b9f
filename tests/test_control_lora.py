"""Control LoRAs (FLUX.1-Canny-dev-lora, FLUX.1-Depth-dev-lora) on dev against diffusers' FluxControlPipeline
after load_lora_weights, at float32 on the tiny dev folder, fed the same noise (VAE posterior mean): dev's
x_embedder widened to 128 inputs, the replacement q/k norms loaded unscaled, and an ordinary LoRA beside it
zero-padded. As in test_control.py the denoised latents are compared too; breaking the widening or the norm
replacement moves them far past the bound."""

import json
import re
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image

from mflux import Config, Flux1
from mflux.errors import InvalidArgument
from mflux.runtime import lora
from tests import lora_files as lf
from tests.test_control import H, W, edges
from tests.test_generation import BOUND, PROMPT, diff, noise
from tests.test_kontext_fill import LATENT_BOUND, LATENT_GAP, _diffusers, gap, ours, reference

CONTROL_SCALE, EXTRA_SCALE = 0.9, 0.7


def control_lora_tensors(shapes: dict, seed: int = 3) -> dict:
    """A Control LoRA as the real file holds it (here in diffusers/PEFT names): x_embedder 128 inputs wide,
    block LoRAs, each up half with a bias (PEFT's lora_bias), and full replacement weights for every
    block's norm_q, norm_k, norm_added_q, norm_added_k."""
    rng = np.random.default_rng(seed)
    hidden, _ = shapes["x_embedder"]
    spec = {"transformer.x_embedder": lf.pair(rng, 4, 128, hidden)}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        spec[f"transformer.{name}"] = lf.pair(rng, 4, shapes[name][1], shapes[name][0], amp=0.3)
    norms = {  # every block's q/k norms: the real file replaces them all
        f"transformer.{name}.weight": (1 + 0.5 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in shapes.items()
        if ".attn.norm_" in name
    }
    biases = {
        f"{name}.lora_B.bias": 0.1 * rng.standard_normal(up.shape[0]).astype(np.float32)
        for name, (_, up) in spec.items()
    }
    return lf.peft(spec) | biases | norms


def norm_shapes(folder) -> dict:
    from mflux.runtime.weights import TensorSource

    src = TensorSource.from_folder(folder / "transformer")
    return {k[: -len(".weight")]: src.shape(k) for k in src.keys() if ".norm_" in k}


@pytest.fixture(scope="module")
def loras(tiny_dev, tmp_path_factory):
    shapes = lf.transformer_shapes(tiny_dev) | norm_shapes(tiny_dev)
    folder = tmp_path_factory.mktemp("control_loras")
    control = lf.save(folder / "control.safetensors", control_lora_tensors(shapes))
    rng = np.random.default_rng(5)
    hidden, in_dims = shapes["x_embedder"]
    extra = {"transformer.x_embedder": lf.pair(rng, 4, in_dims, hidden)}  # 64 wide: padded to 128
    extra["transformer.transformer_blocks.0.attn.to_v"] = lf.pair(rng, 4, hidden, hidden, amp=0.3)
    return control, lf.save(folder / "extra.safetensors", lf.peft(extra))


def diffusers_case(tiny_dev, paths: list, eps, steps: int = 3):
    pipe = _diffusers("FluxControlPipeline", tiny_dev)
    names = [f"lora{i}" for i in range(len(paths))]
    for name, (path, _) in zip(names, paths):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[s for _, s in paths])
    return reference(
        pipe, eps, prompt=PROMPT, control_image=edges(H, W), height=H, width=W, num_inference_steps=steps,
        guidance_scale=3.5,
    )  # fmt: skip


def mflux_case(tiny_dev, paths: list, eps, steps: int = 3, **kwargs):
    flux = Flux1.from_path(
        tiny_dev, precision="float32", lora_paths=[p for p, _ in paths], lora_scales=[s for _, s in paths],
        **kwargs,
    )  # fmt: skip
    return ours(flux, PROMPT, Config(steps, H, W, guidance=3.5), eps, control_image=edges(H, W))


@pytest.fixture(scope="module")
def want(tiny_dev, loras):
    """diffusers' image and latents for the Control LoRA alone, and with the ordinary LoRA after it."""
    from unittest import mock

    from diffusers.models.autoencoders import vae as vae_module

    control, extra = loras
    eps = noise(1, H, W, seed=29)
    with mock.patch.object(
        vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    ):
        alone = diffusers_case(tiny_dev, [(control, CONTROL_SCALE)], eps)
        both = diffusers_case(tiny_dev, [(control, CONTROL_SCALE), (extra, EXTRA_SCALE)], eps)
    return eps, {"alone": alone, "both": both}


@pytest.mark.parametrize("case", ["alone", "both"])
def test_control_lora_on_dev_equals_diffusers(case, tiny_dev, loras, want):
    eps, refs = want
    control, extra = loras
    paths = [(control, CONTROL_SCALE)] + ([(extra, EXTRA_SCALE)] if case == "both" else [])
    image, latents = mflux_case(tiny_dev, paths, eps)
    want_image, want_latents = refs[case]
    d, g = diff(image.image, want_image), gap(latents, want_latents)
    print(f"dev + Control LoRA ({case}) vs diffusers: max |diff| {d}/255, latents {g:.1e}")
    assert d <= BOUND and g <= LATENT_BOUND


@pytest.mark.parametrize("breakage", ["widening", "norms", "lora_bias"])
def test_broken_control_lora_fails_the_comparison(breakage, tiny_dev, loras, want, monkeypatch):
    eps, refs = want
    widen = lora._widen

    def widened_on_the_wrong_side(root, updates):  # dev's columns where the control latents go
        done = widen(root, updates)
        layer = root.img_in
        layer.weight = mx.concatenate([layer.weight[:, 64:], layer.weight[:, :64]], axis=1)
        return done

    if breakage == "widening":
        monkeypatch.setattr(lora, "_widen", widened_on_the_wrong_side)
    elif breakage == "norms":
        monkeypatch.setattr(lora, "_replace_norms", lambda root, files: None)
    else:  # the up halves' biases left out (they are then reported as unmatched)
        monkeypatch.setattr(lora, "_BIAS", re.compile("^$"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # left-out biases are reported as unmatched
        _, latents = mflux_case(tiny_dev, [(loras[0], CONTROL_SCALE)], eps)
    assert gap(latents, refs["alone"][1]) > LATENT_GAP


def test_norms_are_replaced_unscaled_and_img_in_widened(tiny_dev, loras):
    flux = Flux1.from_path(tiny_dev, precision="float32", lora_paths=[loras[0]], lora_scales=[0.25])
    transformer = flux.get("transformer")
    from mflux.runtime.weights import SafetensorsFile

    file = SafetensorsFile(loras[0])
    want = np.array(file.load("transformer.transformer_blocks.0.attn.norm_added_k.weight"))
    got = np.array(transformer.double_blocks[0].txt_attn.norm.key_norm.scale)
    assert np.array_equal(got, want)  # as the file holds it, whatever the LoRA scale
    assert transformer.img_in.base.weight.shape[1] == 128 and transformer.params.in_channels == 128
    assert not np.array(transformer.img_in.base.weight[:, 64:]).any()  # the new columns start at zero


def test_quantized_dev_keeps_the_widened_img_in_float(tiny_dev, loras):
    """On a quantized dev the widened img_in is dequantized and stays float (lora.py says why): dev's own
    columns are the quantized layer's values exactly, the control columns zero, and an image comes out."""
    plain = Flux1.from_path(tiny_dev, precision="float32", quantize=8).get("transformer").img_in
    assert isinstance(plain, nn.QuantizedLinear)
    flux = Flux1.from_path(tiny_dev, precision="float32", quantize=8, lora_paths=[loras[0]])
    layer = flux.get("transformer").img_in.base
    assert type(layer) is nn.Linear and layer.weight.shape[1] == 128
    dequantized = mx.dequantize(plain.weight, plain.scales, plain.biases, plain.group_size, plain.bits)
    assert np.array_equal(np.array(layer.weight[:, :64]), np.array(dequantized))
    assert not np.array(layer.weight[:, 64:]).any()
    image = flux.generate_image(0, PROMPT, Config(1, H, W), control_image=edges(H, W))
    assert image.image.size == (W, H)


def test_control_lora_misuse_is_refused_before_any_load(tiny_dev, tiny_schnell, loras):
    with pytest.raises(InvalidArgument, match="is a Control LoRA for FLUX.1 dev .* schnell can't take it"):
        Flux1.from_path(tiny_schnell, lora_paths=[loras[0]])
    flux = Flux1.from_path(tiny_dev, precision="float32", lora_paths=[loras[0]])
    with pytest.raises(InvalidArgument, match="dev with a Control LoRA follows a control image"):
        flux.generate_image(0, PROMPT, Config(1, H, W))
    dev = Flux1.from_path(tiny_dev, precision="float32", lora_paths=[loras[1]])
    with pytest.raises(InvalidArgument, match="control_image= needs a canny or depth model; dev takes none"):
        dev.generate_image(0, PROMPT, Config(1, H, W), control_image=edges(H, W))
    assert not flux.models.modules and not dev.models.modules


def test_cli_dev_with_a_control_lora_follows_a_map_and_replays_exactly(tiny_dev, loras, tmp_path):
    from tests.test_kontext_fill import _cli, _meta

    edges(H, W).save(tmp_path / "edges.png")
    args = [
        "--path",
        str(tiny_dev),
        "--steps",
        "1",
        "--seed",
        "6",
        "--prompt",
        PROMPT,
        "--control",
        "edges.png",
    ]
    made = _cli(*args, "--lora-paths", str(loras[0]), "-o", "c.png", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    m = _meta(tmp_path / "c.png")
    assert (m["variant"], m["lora_paths"], len(m["control_sha256"])) == ("dev", [str(loras[0])], 64)
    again = _cli("--path", str(tiny_dev), "--from", "c.png", "-o", "d.png", cwd=tmp_path)
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.array(Image.open(tmp_path / "c.png")), np.array(Image.open(tmp_path / "d.png")))


@pytest.mark.parametrize(
    "model, extra, words",
    [
        ("schnell", ["--control", "edges.png"], "is a Control LoRA for FLUX.1 dev"),
        (
            "dev",
            [],
            "dev with a Control LoRA follows an edge or depth map: give --control IMAGE (or --control-from PHOTO "
            "--canny)",
        ),
    ],
)
def test_cli_refuses_control_lora_misuse_before_any_load(
    model, extra, words, loras, tmp_path, monkeypatch, tiny_dev, tiny_schnell
):
    import mflux.flux1
    from tests.test_kontext_fill import _cli

    edges(H, W).save(tmp_path / "edges.png")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was opened before the settings were refused")

    monkeypatch.setattr(mflux.flux1.Flux1, "__init__", no_load)
    folder = tiny_schnell if model == "schnell" else tiny_dev
    result = _cli(
        "--path", str(folder), "--prompt", PROMPT, "--steps", "1", "--lora-paths", str(loras[0]), *extra,
        cwd=tmp_path,
    )  # fmt: skip
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and words in lines[0], result.output


# --- canny-lora, depth-lora: one LoRA file in the store -------------------------------------------

CANNY_LORA = "black-forest-labs/FLUX.1-Canny-dev-lora"


@pytest.fixture
def hub(loras, tmp_path_factory, monkeypatch, tmp_path):
    """The local Hub serving the Control LoRA fixture as the real repo lays it out (gated, the file at the
    root beside files a pull must not take)."""
    import shutil

    from mflux.catalog import catalog
    from tests.hub_server import HubServer, point_client_at

    repo = tmp_path_factory.mktemp("canny_lora_repo")
    shutil.copy(loras[0], repo / "flux1-canny-dev-lora.safetensors")
    (repo / "README.md").write_text("# FLUX.1 Canny [dev] LoRA\n")
    (repo / "LICENSE.md").write_text("non-commercial\n")
    with HubServer() as server:
        server.add_repo(
            CANNY_LORA, repo, gated=True, commit="0" * 39 + "1", refs=(catalog()["canny-lora"].revision,)
        )
        point_client_at(server, monkeypatch, tmp_path)
        yield server


def test_pull_canny_lora_stores_one_lora_file(hub, loras, tiny_dev, tmp_path, monkeypatch, mflux_home):
    from click.testing import CliRunner

    from mflux import hub as mflux_hub
    from mflux.cli import cli
    from mflux.errors import MfluxError
    from mflux.store import Store
    from tests.hub_server import GOOD_TOKEN
    from tests.test_kontext_fill import _cli, _meta

    with pytest.raises(MfluxError, match=f"{CANNY_LORA} is gated"):
        mflux_hub.pull("canny-lora", progress=False)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    stored = mflux_hub.pull("canny-lora", progress=False)
    assert stored.manifest.kind == "lora" and [f["path"] for f in stored.manifest.files] == [
        "flux1-canny-dev-lora.safetensors"
    ]
    assert sorted(p.name for p in stored.path.iterdir()) == [
        "flux1-canny-dev-lora.safetensors",
        "manifest.toml",
    ]
    listed = CliRunner().invoke(cli, ["list"])
    assert listed.exit_code == 0 and any(
        line.split()[:2] == ["canny-lora", "lora"] for line in listed.output.splitlines()
    )

    inspected = CliRunner().invoke(cli, ["inspect", "canny-lora", "--json"])
    assert inspected.exit_code == 0 and json.loads(inspected.output)["kind"] == "lora", inspected.output

    edges(H, W).save(tmp_path / "edges.png")
    args = ["--path", str(tiny_dev), "--steps", "1", "--prompt", PROMPT, "--control", "edges.png"]
    made = _cli(*args, "--lora-paths", "canny-lora", "-o", "c.png", cwd=tmp_path)
    assert made.exit_code == 0, made.output
    assert _meta(tmp_path / "c.png")["lora_paths"] == [str(stored.path / "flux1-canny-dev-lora.safetensors")]
    flux = Flux1.from_path(tiny_dev, lora_paths=["canny-lora"])  # the API takes the name too
    assert flux.condition == "control"

    for name in ("canny-lora", "canny-lora-q4"):
        with pytest.raises(InvalidArgument, match="canny-lora is a LoRA, not a model: load it on dev"):
            Store().resolve(name)
    converted = CliRunner().invoke(cli, ["convert", "canny-lora", "--name", "c"])
    assert converted.exit_code == 1 and "canny-lora is a LoRA, not a model" in converted.output
    removed = CliRunner().invoke(cli, ["rm", "canny-lora", "--yes"])
    assert removed.exit_code == 0, removed.output
    assert not Store().exists("canny-lora")


def test_a_lora_not_pulled_yet_is_named_with_its_pull(tiny_dev, tmp_path):
    from tests.test_kontext_fill import _cli

    result = _cli("--path", str(tiny_dev), "--prompt", PROMPT, "--lora-paths", "depth-lora", cwd=tmp_path)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines == [
        "error: LoRA 'depth-lora' is not in the store (get it with: mflux pull depth-lora)"
    ]
    model = _cli("-m", "depth-lora", "--prompt", PROMPT, cwd=tmp_path)
    assert model.exit_code == 1 and "depth-lora is a LoRA, not a model" in model.output


def test_black_forest_labs_names_equal_peft(tiny_dev, tmp_path):
    """The released files use Black Forest Labs' names (`img_in.lora_A.weight`, `...query_norm.scale`),
    which diffusers' converter reads only at full size: here a BFL-named twin of the PEFT fixture gives
    the same latents."""
    shapes = lf.transformer_shapes(tiny_dev) | norm_shapes(tiny_dev)
    peft = {
        k: v for k, v in control_lora_tensors(shapes).items() if ".to_q." not in k
    }  # q: a fused row slice
    bfl = {}
    for key, value in peft.items():
        module, suffix = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
        bfl[lora.norm_path(key) or f"{lora.resolve(module)[0].path}.{suffix}"] = value
    assert "img_in.lora_B.bias" in bfl and "double_blocks.0.txt_attn.norm.key_norm.scale" in bfl
    eps = noise(1, H, W, seed=31)
    latents = [
        mflux_case(
            tiny_dev, [(lf.save(tmp_path / f"{name}.safetensors", tensors), CONTROL_SCALE)], eps, steps=1
        )[1]
        for name, tensors in (("peft", peft), ("bfl", bfl))
    ]
    assert np.array_equal(latents[0], latents[1])


def test_inspect_counts_the_norms_and_the_wide_img_in(loras):
    report = lora.inspect_lora(loras[0])
    opened = lora.open_lora(loras[0])
    file_keys = len(opened.file.keys())
    opened.file.close()
    assert report["norms"] > 0 and report["unmatched"] == 0
    assert report["components"]["transformer"]["tensor_count"] == file_keys
    assert lora.control_width(loras[0]) == 128 and lora.control_width(loras[1]) == 64


def test_the_server_does_not_offer_a_stored_lora_as_a_model(hub, tiny_schnell, monkeypatch):
    # the merge of Redux (not listed: variant redux) with Control LoRAs (kind lora, variant dev)
    import requests

    from mflux import hub as mflux_hub
    from mflux.server.core import ServerSettings
    from tests.fixtures import store_hf_folder
    from tests.hub_server import GOOD_TOKEN
    from tests.server_harness import serving

    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    mflux_hub.pull("canny-lora", progress=False)
    store_hf_folder(tiny_schnell, "schnell")
    with serving(ServerSettings(model="schnell")) as (url, _):
        assert [m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]] == ["schnell"]
        assert [m["model_name"] for m in requests.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()] == [
            "schnell"
        ]
        body = {"prompt": "fox", "size": "32x32", "model": "canny-lora"}
        r = requests.post(f"{url}/v1/images/generations", json=body, timeout=10)
        assert r.status_code == 400 and "canny-lora is a LoRA, not a model" in r.json()["error"]["message"], (
            r.text
        )


def test_cli_dev_with_a_control_lora_takes_a_photo_and_canny(tiny_dev, loras, tmp_path):
    # the merge of --control-from PHOTO --canny (h34x) with Control LoRAs (h34l): the refusal's hint holds
    from tests.test_kontext_fill import _cli, _meta

    photo = np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    args = ["--path", str(tiny_dev), "--steps", "1", "--prompt", PROMPT, "--lora-paths", str(loras[0])]
    made = _cli(
        *args, "--control-from", "photo.png", "--canny", "--save-control", "-o", "c.png", cwd=tmp_path
    )
    assert made.exit_code == 0, made.output
    m = _meta(tmp_path / "c.png")
    assert (m["variant"], len(m["control_from_sha256"])) == ("dev", 64) and (
        tmp_path / "c_control.png"
    ).is_file()
