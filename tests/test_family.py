"""FLUX.1 Kontext, Fill and Krea in the catalog and the store: pull against the local Hub, the manifest's
variant and defaults, `list --available`, `inspect`, and `convert` then `quantize --bits 4` of each tiny
variant keeping its variant (Krea's files are dev's: only the recorded name tells it)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mflux import Config, Flux1, hub
from mflux.catalog import catalog
from mflux.cli import cli
from mflux.convert import convert
from mflux.errors import MfluxError
from mflux.inspector import format_inspect, inspect
from mflux.manifest import read_manifest
from mflux.store import Store
from tests.fixtures import REPO_FILES, store_hf_folder
from tests.hub_server import GOOD_TOKEN, HubServer, point_client_at
from tests.test_convert import assert_refused, write_bfl_twin
from tests.test_generation import init_image, mask_image

FAMILY = ("kontext", "fill", "krea")
SINGLE_FILE = {"kontext": "flux1-kontext-dev.safetensors", "fill": "flux1-fill-dev.safetensors",
               "krea": "flux1-krea-dev.safetensors"}  # fmt: skip
PIPELINE = {"kontext": "FluxKontextPipeline", "fill": "FluxFillPipeline", "krea": "FluxPipeline"}
SIZE = 32


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def twins(tiny_kontext, tiny_fill, tiny_krea, tmp_path_factory) -> dict:
    """Each variant's transformer as the Black Forest Labs single file its repo holds at the root."""
    folders = {"kontext": tiny_kontext, "fill": tiny_fill, "krea": tiny_krea}
    out = tmp_path_factory.mktemp("single_files")
    return {v: write_bfl_twin(folders[v], out / SINGLE_FILE[v]) for v in FAMILY}


@pytest.fixture(scope="module")
def server(tiny_kontext, tiny_fill, tiny_krea, twins):
    folders = {"kontext": tiny_kontext, "fill": tiny_fill, "krea": tiny_krea}
    with HubServer() as s:
        for v in FAMILY:
            entry = catalog()[v]
            root = {
                SINGLE_FILE[v]: twins[v].read_bytes(),
                "ae.safetensors": b"a" * 4096,
                "README.md": b"# FLUX\n",
            }
            s.add_repo(entry.repo, folders[v], gated=True, refs=(entry.revision,), extra=root)
        yield s


@pytest.fixture
def hub_env(server, monkeypatch, tmp_path):
    """The client pointed at the local Hub, online, with no token unless a test sets one."""
    point_client_at(server, monkeypatch, tmp_path)
    server.requests.clear()
    return server


def resolved(server: HubServer) -> set[str]:
    """The repo files a pull asked for (resolve requests), relative to the repo."""
    return {r["path"].split("/", 5)[5] for r in server.requests if "/resolve/" in r["path"]}


def test_catalog_entries():
    for v in FAMILY:
        entry = catalog()[v]
        assert entry.gated and entry.license == catalog()["dev"].license
        assert entry.size_estimated  # dev's size, not read from the repo
        assert entry.allow_patterns == catalog()["dev"].allow_patterns
    assert not catalog()["dev"].size_estimated and not catalog()["schnell"].size_estimated
    assert catalog()["krea"].defaults == catalog()["dev"].defaults


@pytest.mark.parametrize("variant", FAMILY)
def test_pull_records_the_catalog_name_and_its_defaults(variant, hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    model = hub.pull(variant, progress=False)

    manifest = read_manifest(model.path)
    assert manifest.variant == variant, f"stored as {manifest.variant}"
    assert manifest.defaults == catalog()[variant].defaults
    assert manifest.source["repo"] == catalog()[variant].repo
    assert manifest.architecture["pipeline"] == {"class_name": PIPELINE[variant]}
    # Only the folders a run needs: never the single file, ae.safetensors or the README at the root.
    assert sorted(f["path"] for f in manifest.files) == REPO_FILES
    assert resolved(hub_env) == set(REPO_FILES)


def test_pull_under_another_name_keeps_the_variant(hub_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert hub.pull("krea", name="my-krea", progress=False).manifest.variant == "krea"


@pytest.mark.parametrize("variant", FAMILY)
def test_pull_without_a_token_is_refused_as_for_dev(variant, hub_env, mflux_home):
    code, _, err = invoke("pull", variant)
    repo = catalog()[variant].repo
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 1 and len(errors) == 1 and errors == err.splitlines()[-1:], err  # after "pulling ..."
    assert errors[0].startswith(
        f"error: {repo} is gated: accept its license at https://huggingface.co/{repo}"
    )
    assert "hf auth login" in errors[0] and "HF_TOKEN" in errors[0]
    assert Store().list() == []


def test_list_available_marks_estimated_sizes():
    code, out, err = invoke("list", "--available")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    for v in FAMILY:
        assert catalog()[v].repo in rows[v] and "~33.7 GB (est.)" in rows[v], rows[v]
    assert "(est.)" not in rows["dev"] and "(est.)" not in rows["schnell"]
    assert any(
        line.startswith("(est.): an estimate, not read from the repo's files") for line in err.splitlines()
    )
    entries = {e["name"]: e for e in json.loads(invoke("list", "--available", "--json")[1])}
    assert [entries[v]["size_estimated"] for v in ("schnell", "dev", *FAMILY)] == [False] * 2 + [True] * 3


def test_inspect_names_the_variant(tiny_kontext, tiny_fill, tiny_krea, twins):
    store_hf_folder(tiny_krea, "krea", variant="krea")
    report = inspect("krea")
    assert report["variant"] == "krea"
    assert "variant       krea" in format_inspect(report)
    assert inspect(str(tiny_kontext))["variant"] == "kontext"  # model_index.json's pipeline class
    assert inspect(str(tiny_fill))["variant"] == "fill"
    assert inspect(str(tiny_krea))["variant"] == "dev"  # a folder can't tell Krea from dev
    assert inspect(str(twins["fill"]))["variant"] == "fill"  # 384 input channels
    assert inspect(str(twins["kontext"]))["variant"] == "dev"  # dev's exact header


def _generate(name: str, variant: str) -> np.ndarray:
    flux = Flux1.from_name(name, precision="float32")
    config = Config(num_inference_steps=1, height=SIZE, width=SIZE)
    inputs = {
        "kontext": {"image": init_image(SIZE, SIZE), "auto_resize": False},
        "fill": {"image": init_image(SIZE, SIZE), "mask_image": mask_image(SIZE, SIZE)},
        "krea": {},
    }[variant]
    return np.asarray(flux.generate_image(0, "a lighthouse at dusk", config, **inputs).image)


@pytest.mark.parametrize("variant", FAMILY)
def test_convert_then_quantize_keeps_the_variant(variant, tiny_kontext, tiny_fill, tiny_krea, mflux_home):
    folder = {"kontext": tiny_kontext, "fill": tiny_fill, "krea": tiny_krea}[variant]
    store_hf_folder(folder, variant, variant=variant)
    assert invoke("convert", variant)[0] == 0
    assert invoke("quantize", f"{variant}-mlx", "--bits", 4)[0] == 0

    for name in (f"{variant}-mlx", f"{variant}-mlx-q4"):
        manifest = read_manifest(Store().path(name))
        assert manifest.variant == variant, f"{name} stored as {manifest.variant}"
        assert manifest.defaults == catalog()[variant].defaults
        assert manifest.architecture["pipeline"] == {"class_name": PIPELINE[variant]}
    quantized = read_manifest(Store().path(f"{variant}-mlx-q4"))
    assert quantized.quantization["transformer"]["bits"] == 4
    assert quantized.architecture["transformer"]["in_channels"] == (384 if variant == "fill" else 64)
    image = _generate(f"{variant}-mlx-q4", variant)
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0


@pytest.mark.parametrize("variant", ["kontext", "krea"])
def test_a_single_file_takes_the_variant_it_cannot_tell(variant, twins, tiny_dev, mflux_home):
    assert invoke("convert", twins[variant], "--base", tiny_dev, "--name", "plain")[0] == 0
    assert read_manifest(Store().path("plain")).variant == "dev"

    code, _, err = invoke("convert", twins[variant], "--base", tiny_dev, "--variant", variant)
    assert code == 0, err
    manifest = read_manifest(Store().path(twins[variant].stem + "-mlx"))
    assert manifest.variant == variant
    assert manifest.architecture["pipeline"] == {"class_name": PIPELINE[variant]}
    assert manifest.defaults == catalog()[variant].defaults


def test_a_fill_single_file_is_fill(twins, tiny_dev, mflux_home):
    assert invoke("convert", twins["fill"], "--base", tiny_dev)[0] == 0
    manifest = read_manifest(Store().path("flux1-fill-dev-mlx"))
    assert manifest.variant == "fill" and manifest.architecture["transformer"]["in_channels"] == 384


def test_fill_given_variant_dev_is_refused_in_one_line(tiny_fill, twins, tiny_dev, mflux_home):
    line = assert_refused(mflux_home, ["convert", tiny_fill, "--variant", "dev"], "in_channels=384")
    assert "does not fit variant 'dev'" in line
    line = assert_refused(
        mflux_home, ["convert", twins["fill"], "--base", tiny_dev, "--variant", "dev"], "in_channels=384"
    )
    assert str(twins["fill"]) in line
    store_hf_folder(tiny_fill, "fill")
    assert_refused(
        mflux_home, ["convert", "fill", "--variant", "dev"], "fill is a fill model; drop --variant dev"
    )
    with pytest.raises(MfluxError, match="does not fit variant 'krea'"):
        convert(str(tiny_fill), variant="krea", progress=False)
