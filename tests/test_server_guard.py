"""`mflux serve` under a hostile client (issue 33, items 21-25): images decoded off the event loop and capped
before decoding, read deadlines and a connection limit, a bounded shutdown, CSRF and DNS-rebinding checks.
Loopback only; every wait is bounded by a short timeout. The model is a stand-in: nothing here generates."""

import ast
import asyncio
import base64
import itertools
import socket
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from fastapi.routing import APIRoute
from PIL import Image, ImageFile

import mflux.server
from mflux.server.app import create_app
from mflux.server.core import ApiError, Limits, ServerSettings
from tests.fixtures import store_hf_folder
from tests.server_harness import module_store, png_bytes, serving


@pytest.fixture(scope="module")
def mflux_home(tmp_path_factory):
    yield from module_store(tmp_path_factory)


@pytest.fixture(scope="module")
def stored(mflux_home, tiny_schnell):
    store_hf_folder(tiny_schnell, "schnell")


class Endless:
    """A stand-in model whose generation steps every 20 ms until its job is stopped (the worker checks
    between steps), so a test holds a job running without computing anything."""

    folder = SimpleNamespace(defaults={"steps": 4})

    def generate(self, seeds, prompt, *args, **kwargs):
        for step in itertools.count(1):
            time.sleep(0.02)
            yield SimpleNamespace(step=step, total=10**6, previews=None)


def endless(name, loras):
    return Endless()


def guarded(**settings):
    """A server with the stand-in model; `settings` override ServerSettings (limits included)."""
    return serving(ServerSettings(model="schnell", **settings), endless)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends until it closes the connection; fails if it is still open after `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s (got {data[:80]!r})")
    return data


# --- 21: images are decoded off the event loop, and capped before decoding ------------------------------
def png_b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def huge_header_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixels behind it: only a decoder reads past it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _image_requests(url: str) -> dict:
    """(method, path) -> a request sending an image to that route, each with a mask where it takes one."""
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    photo = Image.new("RGB", (32, 32), "red")
    mask = Image.new("L", (32, 32), 255)
    return {
        ("POST", "/v1/images/edits"): lambda: requests.post(
            f"{url}/v1/images/edits",
            files={"image": ("a.png", png_bytes(photo)), "mask": ("m.png", png_bytes(rgba))},
            data={"prompt": "a fox", "size": "32x32", "steps": "1"},
            timeout=10,
        ),
        ("POST", "/sdapi/v1/img2img"): lambda: requests.post(
            f"{url}/sdapi/v1/img2img",
            json={
                "prompt": "a fox",
                "width": 32,
                "height": 32,
                "steps": 1,
                "init_images": [png_b64(photo)],
                "mask": png_b64(mask),
                "mask_blur": 4,
            },
            timeout=10,
        ),
        ("POST", "/mflux/v1/generate"): lambda: requests.post(
            f"{url}/mflux/v1/generate",
            json={"prompt": "a fox", "width": 32, "height": 32, "steps": 1, "image": png_b64(photo)},
            timeout=10,
        ),
    }


# the routes that change state but take no image; a new route must join one table or the other
NO_IMAGE = {
    ("POST", "/v1/images/generations"),
    ("POST", "/sdapi/v1/txt2img"),
    ("POST", "/sdapi/v1/options"),
    ("POST", "/sdapi/v1/interrupt"),
    ("POST", "/sdapi/v1/skip"),
    ("DELETE", "/mflux/v1/jobs/{job_id}"),
}


def api_routes(routes) -> list[APIRoute]:
    """Every APIRoute, inside included routers too (FastAPI 0.12x lists them flat, later ones nest them)."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif getattr(route, "original_router", None) is not None:
            found += api_routes(route.original_router.routes)
    return found


def test_every_route_that_takes_a_body_is_known_to_take_an_image_or_not(stored):
    routes = {
        (method, route.path)
        for route in api_routes(create_app(ServerSettings()).routes)
        for method in route.methods
        if method not in ("GET", "HEAD")
    }
    images = set(_image_requests("http://unused"))
    assert routes == images | NO_IMAGE, (
        f"new or gone routes: {sorted(routes ^ (images | NO_IMAGE))}; a route that takes an image decodes it "
        "with Server.decode_image through off_loop, and joins _image_requests"
    )


def _image_calls_outside_the_decoder() -> list[str]:
    """Each `Image.open` call in mflux/server outside Server.decode_image, as 'file:function'."""
    allowed = {("core.py", "decode_image"), ("a1111_api.py", "_infotext")}  # _infotext: our own PNG's text
    found = []
    for path in Path(mflux.server.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "open"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "Image"
                    and (path.name, func.name) not in allowed
                ):
                    found.append(f"{path.name}:{func.name}")
    return found


def test_only_the_one_decoder_opens_client_images():
    assert _image_calls_outside_the_decoder() == []


@pytest.fixture
def on_loop_image_work(monkeypatch):
    """Records, for each image decode, resize and blur, whether it ran on an event loop's thread."""
    seen = []

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def recording(original, what):
        def wrapper(self, *args, **kwargs):
            seen.append((what, on_loop()))
            return original(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording(ImageFile.ImageFile.load, "decode"))
    monkeypatch.setattr(Image.Image, "resize", recording(Image.Image.resize, "resize"))
    monkeypatch.setattr(Image.Image, "filter", recording(Image.Image.filter, "blur"))
    return seen


@pytest.mark.parametrize("route", sorted(_image_requests("http://unused")))
def test_image_work_runs_off_the_event_loop(stored, on_loop_image_work, route):
    with guarded() as (url, server):

        def not_queued(job):  # stop each request once its images are read: nothing is generated
            raise ApiError(409, "not queued (test)")

        server.submit = not_queued
        response = _image_requests(url)[route]()
        assert response.status_code == 409, response.text
    assert any(what == "decode" for what, _ in on_loop_image_work), "the request decoded no image"
    on_loop = [what for what, loop in on_loop_image_work if loop]
    assert on_loop == [], f"{route}: {on_loop} ran on the event loop, stalling every other request"


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(stored):
    cap = Limits().image_pixels
    with guarded() as (url, _):
        r = requests.post(
            f"{url}/v1/images/edits",
            files={"image": ("big.png", huge_header_png(5000, 5000))},
            data={"prompt": "a fox"},
            timeout=10,
        )
        bomb = requests.post(
            f"{url}/v1/images/edits",
            files={"image": ("bomb.png", huge_header_png(20000, 20000))},  # past PIL's own cap too
            data={"prompt": "a fox"},
            timeout=10,
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (
        f"image is 5000x5000: at most {cap} pixels (scale it down first)"
    ), "refused before decoding (the PNG has no pixel data), naming the cap"
    assert bomb.status_code == 400
    assert bomb.json()["error"]["message"] == f"image has more than {cap} pixels (scale it down first)"
