"""The server under test: `mflux serve`'s app in uvicorn on a free loopback port, in a thread of this process."""

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from mflux.server.app import create_app
from mflux.server.core import ServerSettings
from mflux.server.listen import uvicorn_server


def module_store(tmp_path_factory):
    """One store for a module's server, in place of conftest's per-test one: a test module yields from
    this in its own module-scoped `mflux_home` fixture."""
    home = tmp_path_factory.mktemp("serve_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MFLUX_HOME", str(home))
        yield home


@contextmanager
def serving(settings: ServerSettings, loader=None):
    """Yields (base URL, the app's Server); stops the server (and its worker) on exit."""
    app = create_app(settings, loader)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn_server(app, "127.0.0.1", port, log_level="warning")  # `mflux serve`'s own limits
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def write_lora(folder: Path, tiny_pipeline: Path, name: str = "ink") -> Path:
    """A PEFT LoRA for the tiny transformer that visibly changes its images."""
    import numpy as np

    import tests.lora_files as lf

    d = lf.transformer_shapes(tiny_pipeline)
    rng = np.random.default_rng(0)
    modules = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out", "x_embedder"]
    spec = {f"transformer.{m}": lf.pair(rng, 4, d[m][1], d[m][0], 2.0) for m in modules}
    return lf.save(folder / f"{name}.safetensors", lf.peft(spec))


class Gate:
    """A real Flux1 whose generation waits until the gate opens, so a test can fill the queue first."""

    def __init__(self, flux, gate: threading.Event, order: list):
        self._flux, self._gate, self._order = flux, gate, order

    def __getattr__(self, name):
        return getattr(self._flux, name)

    def generate(self, seeds, prompt, *args, **kwargs):
        if not self._gate.wait(timeout=60):
            raise RuntimeError("the test never opened the gate")
        self._order.append(prompt)
        yield from self._flux.generate(seeds, prompt, *args, **kwargs)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_bytes(image: Image.Image, **text) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def wait_for(predicate, what: str, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
