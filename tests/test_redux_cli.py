"""FLUX.1 Redux on the command line: `mflux pull redux` from the local Hub into a store entry of its own
kind (listed, inspected, removed, never run as a model)."""

import json

import pytest
from click.testing import CliRunner

from mflux import hub
from mflux.catalog import catalog
from mflux.cli import cli
from mflux.manifest import read_manifest
from mflux.store import Store
from tests.hub_server import GOOD_TOKEN, HubServer, point_client_at

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
    code, out, _ = invoke("list", "--available")
    assert any(
        line.split()[:2] == ["redux", REDUX_REPO] and line.split()[-1] == "yes" for line in out.splitlines()
    )
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
