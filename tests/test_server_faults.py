"""The server fault suite (issue 33): what a hostile client, a damaged store or a busy port does to
`mflux serve`. Loopback only; every case is bounded in time (short HTTP timeouts, tiny models, 32 px, one
step). Each refusal is one clear error in the dialect's shape: OpenAI's JSON error, A1111's, or the page's."""

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import uvicorn
from click.testing import CliRunner

from mflux.cli import cli
from mflux.server import process
from mflux.server.core import ServerSettings, end_error
from mflux.server.worker import End
from tests.fixtures import store_hf_folder
from tests.server_harness import module_store, serving


def serve(*args) -> tuple:
    """`mflux serve ARGS` in this process with uvicorn replaced: (exit code, output, uvicorn's calls)."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
        r = CliRunner().invoke(cli, ["serve", *args])
    return r.exit_code, r.output, calls


# --- starting ----------------------------------------------------------------------------------------
def test_a_port_in_use_is_one_line_and_no_banner():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output, calls = serve("--port", str(port))
    assert (code, calls) == (1, [])
    assert output == f"error: port {port} is in use (give --port N or stop the other server)\n"


# --- damaged models ----------------------------------------------------------------------------------
SHARD = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    """Garbage where the header's JSON starts, at the same size and mtime: only reading the file shows it."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[8:16] = b"garbage!"
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def mflux_home(tmp_path_factory):
    yield from module_store(tmp_path_factory)


@pytest.fixture(scope="module")
def store(mflux_home, tiny_schnell):
    """schnell, and two damaged copies: `truncated` (a file of the wrong size, which the store sees) and
    `garbled` (a weight file's header is garbage, which only loading sees)."""
    for name in ("schnell", "truncated", "garbled"):
        store_hf_folder(tiny_schnell, name)
    truncate(mflux_home / "truncated" / SHARD)
    garble(mflux_home / "garbled" / SHARD)
    return mflux_home


def test_a_worker_process_sends_a_load_failure_as_one():
    # a worker process's error crosses the pipe as (kind, message): a failed load stays a 503, a LoRA's a 400
    from mflux.server.worker import LoadFailed  # here: the other cases run on code without it
    for error in (LoadFailed("model x could not be loaded"), LoadFailed("ink.safetensors: bad", lora=True)):
        again = process._error((process._kind(error), str(error)))
        assert type(again) is LoadFailed and (again.lora, str(again)) == (error.lora, str(error))
        status = end_error(End("error", again), 1.0).status
        assert status == (400 if error.lora else 503)


@pytest.mark.parametrize("name", ["truncated", "garbled"])
def test_a_damaged_model_fails_the_start(store, name):
    code, output, calls = serve("--model", name)
    assert (code, calls) == (1, [])
    assert output.count("\n") == 1 and output.startswith("error: ") and SHARD in output, output


@pytest.fixture(scope="module")
def broken(store):
    """A server started (as create_app, past serve's check) on `garbled`, which fails to load."""
    with serving(ServerSettings(model="garbled")) as (url, server):
        yield SimpleNamespace(url=url, server=server)


def test_a_model_that_does_not_load_is_a_503_and_health_says_so(broken):
    url = broken.url
    gen = {"prompt": "fox", "size": "32x32", "steps": 1}
    for body in (gen, {**gen, "model": "truncated"}):
        r = requests.post(f"{url}/v1/images/generations", json=body, timeout=30)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "model_unavailable", error
    message = requests.post(f"{url}/v1/images/generations", json=gen, timeout=30).json()["error"]["message"]
    assert message.startswith("model garbled could not be loaded: garbled/transformer/"), message
    a1111 = {"prompt": "fox", "width": 32, "height": 32, "steps": 1}
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=a1111, timeout=30)
    assert r.status_code == 503 and set(r.json()) == {"error", "detail", "body", "errors"}, r.text
    health = requests.get(f"{url}/health", timeout=10)
    assert health.status_code == 503, health.text
    assert health.json()["status"] == "error" and "garbled" in health.json()["error"]


def test_damaged_models_are_not_listed(broken):
    # `garbled` looks whole to a listing (its sizes are right); `truncated` does not
    models = requests.get(f"{broken.url}/v1/models", timeout=10).json()["data"]
    assert sorted(m["id"] for m in models) == ["garbled", "schnell"]
    sd = requests.get(f"{broken.url}/sdapi/v1/sd-models", timeout=10).json()
    assert sorted(m["model_name"] for m in sd) == ["garbled", "schnell"]
    r = requests.post(
        f"{broken.url}/v1/images/generations", json={"prompt": "fox", "model": "nope"}, timeout=10
    )
    assert r.status_code == 404 and "truncated" not in r.json()["error"]["message"]
