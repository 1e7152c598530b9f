"""FLUX.1 Redux on the command line: `mflux pull redux` from the local Hub into a store entry of its own
kind (listed, inspected, removed, never run as a model); `mflux run --redux IMAGE...` equal to the Python
API (ReduxPrior into Flux1.generate), recorded and replayed exactly, and its misuses refused before any
load."""

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mflux import Config, Flux1, ReduxPrior, hub
from mflux.catalog import catalog
from mflux.cli import cli
from mflux.manifest import read_manifest
from mflux.store import Store
from tests.hub_server import GOOD_TOKEN, HubServer, point_client_at
from tests.test_generation import init_image
from tests.test_kontext_fill import _cli as _run_cli

REDUX_REPO = "black-forest-labs/FLUX.1-Redux-dev"
# The real repo's root files, which a pull must never take.
ROOT_FILES = {"flux1-redux-dev.safetensors": b"r" * 4096, "README.md": b"# FLUX.1 Redux\n"}


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def server(tiny_redux):
    with HubServer() as s:
        s.add_repo(REDUX_REPO, tiny_redux, gated=True, refs=(catalog()["redux"].revision,), extra=ROOT_FILES)
        yield s


@pytest.fixture
def hub_env(server, monkeypatch, tmp_path, mflux_home):
    """The client pointed at the local Hub, online, with a token that may read the gated repo."""
    point_client_at(server, monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    server.requests.clear()
    return server


def repo_files(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_pull_redux_stores_an_entry_of_its_own_kind(hub_env, tiny_redux):
    model = hub.pull("redux", progress=False)
    m = read_manifest(model.path)
    assert (m.name, m.variant, m.format, m.dtype) == ("redux", "redux", "hf", "bfloat16")
    assert m.source["repo"] == REDUX_REPO and m.defaults == {}
    assert set(m.architecture) == {"image_encoder", "image_embedder", "feature_extractor"}
    # the diffusers folders only, as in the repo: never the single file or the README at the root
    assert sorted(f["path"] for f in m.files) == repo_files(tiny_redux)
    assert repo_files(model.path) == sorted([*repo_files(tiny_redux), "manifest.toml"])

    code, out, _ = invoke("list", "--json")
    assert code == 0 and [(e["name"], e["variant"]) for e in json.loads(out)] == [("redux", "redux")]
    code, out, _ = invoke("inspect", "redux")
    assert code == 0 and "variant       redux" in out, out
    assert "image_encoder" in out and "image_embedder" in out
    code, out, _ = invoke("list", "--available", "--json")
    assert any(e["name"] == "redux" and e["repo"] == REDUX_REPO and e["stored"] for e in json.loads(out))
    code, _, err = invoke("rm", "redux", "--yes")
    assert code == 0, err
    assert Store().list() == []


def test_a_redux_entry_is_not_a_model_to_run(hub_env, tmp_path):
    hub.pull("redux", progress=False)
    code, _, err = invoke("run", "-m", "redux", "--prompt", "a cat", "-o", tmp_path / "a.png")
    assert code == 1 and err.strip().splitlines() == [
        "error: redux is FLUX.1 Redux, image prompts for a model, not a model that draws "
        "(use it as: mflux run -m dev --redux IMAGE --redux-model redux)"
    ]
    for command in (["quantize", "redux", "--bits", "4"], ["convert", "redux"]):
        code, _, err = invoke(*command)
        assert code == 1 and "redux is FLUX.1 Redux" in err, (command, err)


def test_pull_of_a_repo_that_is_not_redux_names_what_it_lacks(hub_env, server, tiny_schnell):
    server.add_repo(REDUX_REPO, tiny_schnell, gated=True, commit="f" * 40, refs=("other",))
    code, _, err = invoke("pull", "redux", "--revision", "other")
    assert code == 1 and err.strip().splitlines()[-1].startswith(
        f"error: {REDUX_REPO} is not a FLUX.1 Redux folder: it lacks image_encoder/config.json, "
    ), err
    assert Store().list() == []


# --- mflux run --redux ------------------------------------------------------------------------------


def refs(folder):
    """Two reference images of other sizes than the output (Redux resizes them to SigLIP's square)."""
    init_image(40, 56).save(folder / "a.png")
    init_image(64, 48).transpose(Image.FLIP_LEFT_RIGHT).save(folder / "b.png")
    return ["a.png", "b.png"]


def _cli(*args, cwd):
    return _run_cli(*(str(a) for a in args), cwd=cwd)


def _meta(path) -> dict:
    return json.loads(Image.open(path).text["mflux"])


def pixels(path) -> np.ndarray:
    return np.array(Image.open(path))


def api_image(folder, redux_folder, images, prompt, scales, seed, steps):
    """The same image through the Python API: ReduxPrior's embeddings into Flux1.generate."""
    flux = Flux1.from_path(folder, precision="float32")
    embeds = ReduxPrior.from_path(redux_folder, precision="float32")(
        flux, images, prompt=prompt, prompt_embeds_scale=scales, pooled_prompt_embeds_scale=scales
    )
    image = flux.generate_image(seed, None, Config(steps, 32, 32), prompt_embeds=embeds)
    return np.array(image.image)


@pytest.mark.parametrize("model, prompt", [("schnell", None), ("dev", "a lighthouse")])
def test_cli_redux_equals_the_api_records_and_replays_exactly(model, prompt, request, tiny_redux, tmp_path):
    folder = request.getfixturevalue(f"tiny_{model}")
    images = refs(tmp_path)
    words = [] if prompt is None else ["--prompt", prompt]
    args = ["--path", folder, "--redux", *images, "--redux-scale", "0.7", "0.3", "--redux-model", tiny_redux]
    made = _cli(*args, *words, "--seed", "3", "--steps", "2", "--width", "32", "--height", "32", "-o", "r.png",
                cwd=tmp_path)  # fmt: skip
    assert made.exit_code == 0, made.output
    want = api_image(folder, tiny_redux, [tmp_path / i for i in images], prompt, [0.7, 0.3], 3, 2)
    assert np.array_equal(pixels(tmp_path / "r.png"), want)
    m = _meta(tmp_path / "r.png")
    assert m["redux_sha256"] == [hashlib.sha256((tmp_path / i).read_bytes()).hexdigest() for i in images]
    assert m["redux_scales"] == m["redux_pooled_scales"] == [0.7, 0.3]
    assert m["redux_prompt"] is (prompt is not None) and m["redux_model"] == str(tiny_redux)
    assert Image.open(tmp_path / "r.png").text["ReduxScales"] == "0.7,0.3"  # as exiftool shows it
    again = _cli("--path", folder, "--from", "r.png", "-o", "again.png", cwd=tmp_path)
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "r.png"), pixels(tmp_path / "again.png"))


def test_cli_redux_pulls_the_redux_entry_when_missing(hub_env, tiny_schnell, tmp_path):
    refs(tmp_path)
    made = _cli("--path", tiny_schnell, "--redux", "a.png", "--seed", "1", "--steps", "1", "--width", "32",
                "--height", "32", "-o", "r.png", cwd=tmp_path)  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "redux is not in the store; pulling it first" in made.output
    assert [m.name for m in Store().list()] == ["redux"] and _meta(tmp_path / "r.png")[
        "redux_model"
    ] == "redux"


@pytest.mark.parametrize(
    "model, extra, words",
    [
        ("schnell", ["--redux", "a.png", "--negative-prompt", "blur"], "--redux with --negative-prompt (true CFG with Redux) is not supported yet"),
        ("schnell", ["--prompt", "a cat", "--redux-scale", "0.5"], "--redux-scale needs --redux IMAGE"),
        ("schnell", ["--redux", "a.png", "b.png", "--redux-scale", "1", "2", "3"], "2 --redux images but 3 --redux-scale values"),
        ("schnell", ["--redux", "a.png", "--redux-scale", "nan"], "--redux-scale must be a finite number"),
        ("schnell", ["--redux", "notes.png"], "--redux notes.png: not an image PIL can read"),
        ("schnell", ["--redux", "a.png", "--image", "a.png"], "--redux with --image (img2img or inpainting with Redux) is not supported yet"),
        ("schnell", ["--prompt", "a cat", "--redux-model", "REDUX"], "--redux-model needs --redux IMAGE"),
        ("schnell", ["--redux", "a.png", "--redux-model", "a/missing"], "--redux-model a/missing: no such folder"),
        ("schnell", ["--redux", "a.png", "--redux-model", "SCHNELL"], "not a FLUX.1 Redux folder"),
        ("schnell", ["--redux", "a.png", "--no-pull"], "model 'redux' is not in the store and --no-pull was given"),
        ("fill", ["--redux", "a.png", "--image", "a.png", "--mask", "a.png"], "--redux with fill is not supported yet"),
    ],
)  # fmt: skip
def test_cli_refuses_redux_misuse_before_any_load(
    model, extra, words, request, tiny_redux, tmp_path, monkeypatch, mflux_home
):
    import mflux.flux1

    refs(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was opened before the settings were refused")

    monkeypatch.setattr(mflux.flux1.Flux1, "__init__", no_load)
    folder = request.getfixturevalue(f"tiny_{model}")
    named = {"REDUX": str(tiny_redux), "SCHNELL": str(folder)}
    extra = [named.get(a, a) for a in extra]
    result = _cli("--path", folder, "--steps", "1", *extra, cwd=tmp_path)
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert words in lines[0], result.output


def test_a_prompt_is_still_needed_without_redux(tiny_schnell, tmp_path):
    result = _cli("--path", tiny_schnell, "--steps", "1", cwd=tmp_path)
    assert result.exit_code == 1 and "give --prompt, --prompt-file or --from" in result.output


def test_the_server_does_not_offer_redux_as_a_model(hub_env, tiny_schnell):
    import requests

    from mflux.server.core import ServerSettings
    from tests.fixtures import store_hf_folder
    from tests.server_harness import serving

    store_hf_folder(tiny_schnell, "schnell")
    hub.pull("redux", progress=False)
    with serving(ServerSettings(model="schnell")) as (url, _):
        assert [m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]] == ["schnell"]
        assert [m["model_name"] for m in requests.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()] == [
            "schnell"
        ]
        body = {"prompt": "fox", "size": "32x32", "model": "redux"}
        r = requests.post(f"{url}/v1/images/generations", json=body, timeout=10)
        assert r.status_code == 400 and "redux is FLUX.1 Redux" in r.json()["error"]["message"], r.text
