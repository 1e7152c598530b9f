"""`mflux serve` under a hostile client (issue 33, items 21-25): images decoded off the event loop and capped
before decoding, read deadlines and a connection limit, a bounded shutdown, CSRF and DNS-rebinding checks.
Loopback only; every wait is bounded by a short timeout. The model is a stand-in: nothing here generates."""

import ast
import asyncio
import base64
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
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
from tests.server_harness import module_store, png_bytes, serving, wait_for


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
            json={
                "prompt": "a fox",
                "width": 32,
                "height": 32,
                "steps": 1,
                "image": png_b64(photo),
                "mask": png_b64(mask),
            },
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
    ("POST", "/login"),
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


# --- 22: read deadlines and a connection limit -----------------------------------------------------------
def quick() -> Limits:
    return Limits(head_seconds=0.5, body_seconds=0.5)


def test_a_request_head_that_never_ends_is_closed_with_408(stored):
    with guarded(limits=quick()) as (url, _):
        sock = connect(url)
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
        start = time.monotonic()
        reply = read_until_closed(sock, 5)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert time.monotonic() - start < 3


def test_a_head_sent_a_byte_at_a_time_is_timed_from_the_connection_start(stored):
    with guarded(limits=quick()) as (url, _):
        sock = connect(url)
        start = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
                assert time.monotonic() - start < 5, "still reading a head begun 5 s ago"
        except OSError:
            pass  # closed under our feet: what is wanted
        reply = read_until_closed(sock, 5)
        assert reply.startswith(b"HTTP/1.1 408"), reply


def test_a_keep_alive_connection_gets_a_new_deadline_for_its_next_head(stored):
    with guarded(limits=quick()) as (url, _):
        sock = connect(url)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)  # uvicorn's keep-alive timeout ends at the next byte; ours must not
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        reply = read_until_closed(sock, 5)  # perhaps the rest of the first reply, then the 408
        assert reply.endswith(b"\r\n\r\n") and b"HTTP/1.1 408" in reply, reply


def seconds_until_closed_while_trickling(sock: socket.socket, seconds: float) -> float | None:
    """Sends a byte every 50 ms until the server closes the connection: how long that took (None: open
    after `seconds`)."""
    start = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - start < seconds:
        try:
            sock.sendall(b"x")
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:  # reset: closed
            return time.monotonic() - start
    return None


def test_the_unread_body_of_a_refused_request_cannot_hold_the_connection(stored):
    with guarded(api_key="sekrit", limits=quick()) as (url, _):
        sock = connect(url)
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 401")  # refused before its body is read
        took = seconds_until_closed_while_trickling(sock, 5)  # the rest of the body, a byte at a time
        assert took is not None, "the connection stayed open 5 s while the refused body trickled in"


def test_a_body_that_stalls_is_answered_408_and_closed(stored):
    with guarded(limits=quick()) as (url, _):
        sock = connect(url)
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        reply = read_until_closed(sock, 5)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"did not arrive within 0.5 s" in reply


def test_connections_past_the_limit_get_503(stored):
    with guarded(limits=Limits(connections=3)) as (url, _):
        idle = [connect(url) for _ in range(3)]
        wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 503, "the limit to apply", 5)
        for sock in idle:
            sock.close()
        wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 200, "room again", 5)


# --- 23: a bounded shutdown ------------------------------------------------------------------------------
def test_shutdown_answers_queued_jobs_503_and_ends_within_its_bound(stored):
    replies = {}

    def generate(name, url):
        try:
            replies[name] = requests.post(
                f"{url}/v1/images/generations",
                json={"prompt": name, "size": "32x32", "steps": 2},
                timeout=20,
            )
        except requests.RequestException as e:  # the running job's request is cancelled: no reply
            replies[name] = e

    def running() -> bool:  # not the model's load, which runs as a job too
        job = server.worker.current
        return job is not None and job.prompt == "running"

    with guarded(shutdown_grace=1.0) as (url, server):
        clients = [threading.Thread(target=generate, args=(name, url)) for name in ("running", "q1", "q2")]
        clients[0].start()
        wait_for(running, "the first job to run", 10)
        for c in clients[1:]:
            c.start()
        wait_for(lambda: server.worker.queued() == 2, "two queued jobs", 10)
        stalled = connect(url)  # a client stalled mid-body
        stalled.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99\r\n\r\n{"
        )
        start = time.monotonic()
    # leaving `serving` is uvicorn's SIGTERM: should_exit, then the thread is joined
    assert time.monotonic() - start < 8, "the shutdown outlived its 1 s grace (plus the worker's stop)"
    for c in clients:
        c.join(timeout=10)
    for name in ("q1", "q2"):
        assert isinstance(replies[name], requests.Response), replies[name]
        assert replies[name].status_code == 503, replies[name].text
        assert replies[name].json()["error"]["code"] == "shutting_down"


@pytest.fixture
def served_process(stored, mflux_home):
    """`mflux serve` as a user runs it (no model, so it starts in seconds), on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mflux", "serve", "--port", str(port), "--allowed-hosts", "box.lan"]
    env = {**os.environ, "MFLUX_HOME": str(mflux_home)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, process.stderr.read()
        try:
            return requests.get(f"{url}/health", timeout=1).ok
        except requests.ConnectionError:
            return False

    try:
        wait_for(up, "mflux serve to start", 60)
        yield SimpleNamespace(url=url, process=process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_sigterm_ends_the_server_though_a_client_stalls_mid_body(served_process):
    stalled = connect(served_process.url)
    stalled.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99\r\n\r\n{")
    time.sleep(0.2)  # the server has the head and waits for the body
    served_process.process.send_signal(signal.SIGTERM)
    try:
        served_process.process.wait(timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("mflux serve was still running 8 s after SIGTERM, held by a client stalled mid-body")


# --- 24: the page's cookie: set by the server, HttpOnly, and never sent cross-origin to change state ------
@pytest.fixture(scope="module")
def keyed(stored):
    with serving(ServerSettings(model="schnell", api_key="sekrit"), endless) as (url, server):
        yield url


def test_the_login_sets_an_httponly_strict_cookie(keyed):
    wrong = requests.post(f"{keyed}/login", data={"key": "nope"}, allow_redirects=False, timeout=5)
    assert wrong.status_code == 401 and 'name="key"' in wrong.text and "set-cookie" not in wrong.headers
    right = requests.post(f"{keyed}/login", data={"key": "sekrit"}, allow_redirects=False, timeout=5)
    assert right.status_code == 303 and right.headers["location"] == "/"
    cookie = right.headers["set-cookie"]
    assert cookie.startswith("mflux_api_key=sekrit;"), cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie, cookie
    session = requests.Session()
    session.post(f"{keyed}/login", data={"key": "sekrit"}, timeout=5)
    assert session.get(f"{keyed}/v1/models", timeout=5).status_code == 200  # the cookie is the key


def test_cookie_requests_from_another_origin_cannot_change_state(keyed):
    cookie = {"mflux_api_key": "sekrit"}
    interrupt = f"{keyed}/sdapi/v1/interrupt"
    other_port = keyed.rsplit(":", 1)[0] + ":1"
    for headers in (
        {"Origin": other_port},  # another port of the same host: same-site, so SameSite=Strict sends it
        {"Origin": "null"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": keyed},
    ):
        r = requests.post(interrupt, cookies=cookie, headers=headers, timeout=5)
        assert r.status_code == 403, (headers, r.text)
        assert "refused" in r.json()["detail"]
    for headers in ({}, {"Origin": keyed, "Sec-Fetch-Site": "same-origin"}):  # scripts, and the page itself
        assert requests.post(interrupt, cookies=cookie, headers=headers, timeout=5).status_code == 200
    bearer = {"Authorization": "Bearer sekrit", "Origin": other_port}  # never sent cross-origin by a browser
    assert requests.post(interrupt, headers=bearer, timeout=5).status_code == 200
    assert requests.get(f"{keyed}/v1/models", cookies=cookie, headers={"Origin": other_port}, timeout=5).ok


# --- 25: without a key, only names that cannot be rebound -----------------------------------------------
def test_without_a_key_only_loopback_ip_and_allowed_host_names_are_served(stored):
    with guarded(allowed_hosts=("box.lan",)) as (url, _):
        port = url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "192.168.1.20:7860", "BOX.lan:80"):
            assert requests.get(f"{url}/health", headers={"Host": host}, timeout=5).status_code == 200, host
        for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "", "[bad"):
            r = requests.get(f"{url}/v1/models", headers={"Host": host}, timeout=5)
            assert r.status_code == 403, host
            assert "--allowed-hosts" in r.json()["error"]["message"], r.text


def test_with_a_key_any_host_is_served_and_the_origin_is_still_checked(keyed):
    auth = {"Authorization": "Bearer sekrit", "Host": "evil.example"}
    assert requests.get(f"{keyed}/v1/models", headers=auth, timeout=5).status_code == 200
    assert requests.get(f"{keyed}/v1/models", headers={"Host": "evil.example"}, timeout=5).status_code == 401


def test_without_a_key_a_page_on_another_origin_cannot_change_state(stored):
    with guarded() as (url, _):
        r = requests.post(f"{url}/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"}, timeout=5)
        assert r.status_code == 403, r.text
        assert requests.post(f"{url}/sdapi/v1/interrupt", headers={"Origin": url}, timeout=5).ok


def test_allowed_hosts_reach_the_server_from_the_command_line(served_process):
    url = served_process.url
    assert requests.get(f"{url}/health", headers={"Host": "box.lan:7860"}, timeout=5).status_code == 200
    assert requests.get(f"{url}/health", headers={"Host": "evil.example"}, timeout=5).status_code == 403


def test_allowed_hosts_must_be_host_names():
    r = subprocess.run(
        [sys.executable, "-m", "mflux", "serve", "--allowed-hosts", "box.lan,http://x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "'http://x' is not a host name" in r.stderr, r.stderr
