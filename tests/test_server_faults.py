"""The server fault suite (issue 33): what a hostile client, a damaged store or a busy port does to
`mflux serve`. Loopback only; every case is bounded in time (short HTTP timeouts, tiny models, 32 px, one
step). Each refusal is one clear error in the dialect's shape: OpenAI's JSON error, A1111's, or the page's."""

import base64
import io
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import uvicorn
from click.testing import CliRunner
from PIL import Image

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


# --- hostile input -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx")
    return folder


@pytest.fixture(scope="module")
def srv(store, lora_dir):
    with serving(ServerSettings(model="schnell", lora_dir=lora_dir)) as (url, server):
        yield SimpleNamespace(url=url, server=server, lora_dir=lora_dir)


def post(srv, path: str, body, status: int) -> dict:
    """POST a JSON body (a dict, or raw JSON text); the status is checked, and the error's shape: A1111's
    under /sdapi, OpenAI's elsewhere (the page's API included). Returns the error as {message, param}."""
    kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
    r = requests.post(f"{srv.url}{path}", headers={"Content-Type": "application/json"}, timeout=30, **kwargs)
    assert r.status_code == status, (path, r.status_code, r.text[:300])
    err = r.json()
    if path.startswith("/sdapi/"):
        assert set(err) == {"error", "detail", "body", "errors"}, err
        return {"message": err["detail"], "param": None}
    assert set(err["error"]) == {"message", "type", "param", "code"}, err
    return err["error"]


def image_b64(image: Image.Image, **save) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return base64.b64encode(buf.getvalue()).decode()


SMALL = {"width": 32, "height": 32, "steps": 1}
INIT = image_b64(Image.new("RGB", (32, 32), (200, 40, 40)))


def test_a_model_title_that_is_not_text(srv):
    body = {"prompt": "fox", **SMALL, "override_settings": {"sd_model_checkpoint": 5}}
    assert "sd_model_checkpoint" in post(srv, "/sdapi/v1/txt2img", body, 400)["message"]


@pytest.mark.parametrize("seed", ["9" * 5000, "²", "１２", "18446744073709551616"])
def test_page_seeds_that_are_not_seeds(srv, seed):
    error = post(srv, "/mflux/v1/generate", {"prompt": "fox", **SMALL, "seed": seed}, 400)
    assert error["param"] == "seed" and "0..18446744073709551615" in error["message"]
    assert len(error["message"]) < 200  # 5000 digits are not echoed back


def test_a_lone_surrogate_in_a_prompt_is_refused_in_every_dialect(srv):
    for path, body in (
        ("/v1/images/generations", '{"prompt": "a \\ud800 fox", "size": "32x32", "steps": 1}'),
        ("/sdapi/v1/txt2img", '{"prompt": "a fox", "negative_prompt": "\\udfff", "width": 32, "height": 32}'),
        ("/mflux/v1/generate", '{"prompt": "a \\ud800 fox", "width": 32, "height": 32, "steps": 1}'),
        # any text field: the replies echo them, and the echo failed after the images were made
        ("/sdapi/v1/txt2img", '{"prompt": "fox", "sampler_name": "\\ud800", "width": 32, "height": 32}'),
        ("/v1/images/generations", '{"prompt": "fox", "size": "32x32", "user": "\\ud800", "steps": 1}'),
    ):
        assert "lone surrogate" in post(srv, path, body, 400)["message"], path


def test_a_lone_surrogate_in_the_python_api(store):
    from mflux import Config, Flux1
    from mflux.errors import InvalidArgument

    flux = Flux1.from_name("schnell")
    with pytest.raises(InvalidArgument, match="lone surrogate"):
        flux.generate_image(
            seed=1, prompt="a \ud800 fox", config=Config(num_inference_steps=1, width=32, height=32)
        )


def mflux_run(store: Path, *args) -> subprocess.CompletedProcess:
    """`mflux run ARGS` through the installed command on `store`: what a user types."""
    command = [sys.executable, "-m", "mflux", "run", "-m", "schnell", *args]
    env = {**os.environ, "MFLUX_HOME": str(store)}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_bytes_that_are_not_utf8_in_a_cli_prompt(store, tmp_path):
    # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
    out = tmp_path / "a.png"
    r = mflux_run(
        store, "--prompt", b"a \xff fox", "--steps", "1", "--width", "32", "--height", "32", "-o", out
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: --prompt is not valid text: character 3 is a lone surrogate"), r.stderr
    assert r.stderr.count("\n") == 1 and not out.exists()


def test_a_png_with_a_garbage_exif_block(srv):
    bad = image_b64(Image.new("RGB", (32, 32)), exif=b"garbage!" * 4)
    body = {"prompt": "fox", **SMALL, "init_images": [bad]}
    assert "init_images" in post(srv, "/sdapi/v1/img2img", body, 400)["message"]


def test_a_mask_blur_past_any_image_is_refused(srv):
    for name in ("mask_blur", "mask_blur_x"):
        body = {"prompt": "fox", **SMALL, "init_images": [INIT], "mask": INIT, name: 10**20}
        assert f"{name} must be in 0..64" in post(srv, "/sdapi/v1/img2img", body, 400)["message"]


ZERO_STEPS = "gives zero steps at this step count"


def test_a_strength_that_leaves_no_step(srv, store, tmp_path):
    body = {"prompt": "fox", **SMALL, "init_images": [INIT], "denoising_strength": 1e-20}
    assert ZERO_STEPS in post(srv, "/sdapi/v1/img2img", body, 400)["message"]
    r = requests.post(
        f"{srv.url}/v1/images/edits",
        files={"image": ("a.png", base64.b64decode(INIT), "image/png")},
        data={"prompt": "fox", "strength": "1e-20", "steps": "1"},
        timeout=30,
    )
    assert r.status_code == 400 and ZERO_STEPS in r.json()["error"]["message"], r.text
    (tmp_path / "init.png").write_bytes(base64.b64decode(INIT))
    r = mflux_run(
        store, "--prompt", "fox", "--steps", "4", "--image", tmp_path / "init.png", "--strength", "1e-20"
    )
    assert r.returncode == 1 and r.stderr.startswith("error: --strength 1e-20 " + ZERO_STEPS), r.stderr
    assert r.stderr.count("\n") == 1


def test_a_strength_that_leaves_no_step_in_the_python_api(store):
    from mflux import Config, Flux1
    from mflux.errors import InvalidArgument

    flux = Flux1.from_name("schnell")
    init = Image.new("RGB", (32, 32))
    with pytest.raises(InvalidArgument, match=ZERO_STEPS):
        flux.generate_image(
            seed=1, prompt="fox", image=init, strength=1e-20, config=Config(width=32, height=32)
        )


# --- the small ones --------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [{"batch_size": -1, "n_iter": -1}, {"batch_size": 0}, {"n_iter": -2}])
def test_a1111_counts_are_each_at_least_one(srv, counts):
    name = next(iter(counts))
    error = post(srv, "/sdapi/v1/txt2img", {"prompt": "fox", **SMALL, **counts}, 400)
    assert error["message"] == f"{name} must be at least 1, got {counts[name]}"


def test_a_corrupt_lora_is_named_without_the_servers_folder(srv):
    a1111 = post(srv, "/sdapi/v1/txt2img", {"prompt": "fox <lora:broken:1>", **SMALL}, 400)["message"]
    oai = post(
        srv,
        "/v1/images/generations",
        {"prompt": "fox", "size": "32x32", "steps": 1, "loras": [{"name": "broken"}]},
        400,
    )["message"]
    for message in (a1111, oai):
        assert "broken.safetensors" in message and str(srv.lora_dir) not in message, message


@pytest.mark.parametrize("kind", ["GIF", "BMP", "TIFF", "ICO"])
def test_only_png_jpeg_and_webp_are_decoded(srv, kind):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format=kind)
    body = {"prompt": "fox", **SMALL, "init_images": [base64.b64encode(buf.getvalue()).decode()]}
    assert "send a PNG, JPEG or WebP" in post(srv, "/sdapi/v1/img2img", body, 400)["message"]


@pytest.fixture(scope="module")
def keyed(store):
    with serving(ServerSettings(api_key="sekrit"), loader=lambda name, loras: None) as (url, server):
        yield SimpleNamespace(url=url, server=server)


def test_the_page_cannot_be_framed_or_sniffed(keyed):
    for path, cookie in (("/", "mflux_api_key=sekrit"), ("/", ""), ("/ui/app.js", "mflux_api_key=sekrit")):
        r = requests.get(f"{keyed.url}{path}", headers={"Cookie": cookie}, timeout=10)
        assert r.headers["X-Frame-Options"] == "DENY", (path, cookie)
        assert r.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_another_apps_cookie_does_not_hide_the_key(keyed):
    for cookie in ('prefs={"theme":"dark"}; mflux_api_key=sekrit', 'mflux_api_key=sekrit; a="b;c"; x'):
        assert requests.get(f"{keyed.url}/", headers={"Cookie": cookie}, timeout=10).status_code == 200
    wrong = 'prefs={"theme":"dark"}; mflux_api_key=nope'
    assert requests.get(f"{keyed.url}/", headers={"Cookie": wrong}, timeout=10).status_code == 401


def test_one_job_waiting_is_singular():
    from mflux.server.worker import QueueFull

    assert str(QueueFull(1, 3)) == "the queue is full (1 job waiting; retry after 3 s)"
    assert str(QueueFull(16, 3)) == "the queue is full (16 jobs waiting; retry after 3 s)"
