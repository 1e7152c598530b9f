"""`mflux serve` through real clients: OpenAI's SDK, webuiapi (an A1111 client) and plain HTTP, against one
server on a loopback port with the tiny models in a store of its own. Images are 32 px, 1 or 2 steps."""

import base64
import io
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import requests
import webuiapi
from click.testing import CliRunner
from PIL import Image

from mflux import Config, Flux1
from mflux.server.core import ApiError, Limits, ServerSettings, seed_run
from mflux.server.openai_api import IMG2IMG_STRENGTH, INPAINT_STRENGTH, openai_mask_to_mflux
from mflux.server.worker import _load_flux, preview_steps
from tests.fixtures import store_hf_folder
from tests.server_harness import Gate, module_store, pixels, png, png_bytes, serving, wait_for, write_lora

SIZE = "32x32"  # the smallest size the tiny VAE decodes quickly; the server is what is tested
PX = 32
FAST = {"steps": 2}


@pytest.fixture(scope="module")
def mflux_home(tmp_path_factory):
    yield from module_store(tmp_path_factory)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_schnell):
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder, tiny_schnell)
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def srv(mflux_home, tiny_schnell, tiny_dev, lora_dir):
    store_hf_folder(tiny_schnell, "schnell")
    store_hf_folder(tiny_dev, "dev")
    gate, order, loads = threading.Event(), [], []
    gate.set()

    def loader(name, loras):
        loads.append((name, loras))
        return Gate(_load_flux(name, loras), gate, order)

    settings = ServerSettings(model="schnell", lora_dir=lora_dir, queue=10)
    with serving(settings, loader) as (url, server):
        yield SimpleNamespace(url=url, server=server, gate=gate, order=order, loads=loads)


@pytest.fixture
def oai(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def a1111(srv):
    host, port = srv.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)


# --- OpenAI -----------------------------------------------------------------------------------------------
def test_openai_generate_n_images_b64(oai):
    r = oai.images.generate(
        model="schnell",
        prompt="a red fox",
        n=2,
        size=SIZE,
        response_format="b64_json",
        extra_body={"seed": 7, **FAST},
    )
    assert r.size == SIZE and r.output_format == "png" and len(r.data) == 2
    a, b = png(r.data[0].b64_json), png(r.data[1].b64_json)
    assert a.size == b.size == (PX, PX) and a.format == "PNG"
    assert (a.text["Seed"], b.text["Seed"]) == ("7", "8")  # image i gets seed + i, in the PNG's metadata
    assert "Steps: 2" in a.text["parameters"]
    assert np.abs(pixels(a) - pixels(b)).max() > 0
    again = oai.images.generate(prompt="a red fox", size=SIZE, extra_body={"seed": 8, **FAST})
    assert np.array_equal(pixels(png(again.data[0].b64_json)), pixels(b))  # the seed decides the image


def test_openai_stream_sends_partial_images_then_the_image(oai):
    events = list(
        oai.images.generate(
            prompt="a red fox", size=SIZE, stream=True, partial_images=2, extra_body={"seed": 8, **FAST}
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert (e.size, e.output_format, e.quality, e.background) == (SIZE, "png", "auto", "auto")
        assert abs(e.created_at - time.time()) < 120 and png(e.b64_json).size == (PX, PX)
    plain = oai.images.generate(prompt="a red fox", size=SIZE, extra_body={"seed": 8, **FAST})
    assert np.array_equal(pixels(png(events[-1].b64_json)), pixels(png(plain.data[0].b64_json)))
    two = oai.images.generate(
        prompt="a red fox", n=2, size=SIZE, stream=True, partial_images=1, extra_body=FAST
    )
    assert [e.type.split(".")[1] for e in two] == ["partial_image", "completed", "completed"]  # the first's


def test_seed_runs():
    assert seed_run(0, 3) == [0, 1, 2] and seed_run(2**64 - 2, 2) == [2**64 - 2, 2**64 - 1]
    with pytest.raises(ApiError, match="seed must be in 0.."):
        seed_run(2**64 - 1, 2)
    assert 0 <= seed_run(None, 1)[0] < 2**32


def test_preview_steps_are_evenly_spaced():
    assert preview_steps(3, 4) == {1, 2, 3}
    assert preview_steps(1, 4) == {2}
    assert preview_steps(2, 2) == {1, 2}
    assert preview_steps(3, 1) == {1}


def test_openai_url_response_is_a_random_name_served_read_only(oai, srv):
    r = oai.images.generate(
        prompt="a red fox", size=SIZE, response_format="url", extra_body={"seed": 8, **FAST}
    )
    url = r.data[0].url
    assert url.startswith(f"{srv.url}/outputs/") and url.endswith(".png") and r.data[0].b64_json is None
    got = requests.get(url, timeout=10)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).text["Seed"] == "8"
    assert not [p for p in srv.server.output_dir.iterdir() if p.name.startswith(".")]  # nothing half-written
    assert requests.put(url, data=b"x", timeout=10).status_code == 405
    for bad in ("..%2F..%2Fetc%2Fpasswd", "nope.png", "%2Fetc%2Fpasswd"):
        assert requests.get(f"{srv.url}/outputs/{bad}", timeout=10).status_code == 404


@pytest.fixture(scope="module")
def ref(srv):
    """The Python API on the same store model, in this process: what the server must reproduce."""
    flux = Flux1.from_name("schnell")

    def image(seed, prompt="a red fox", **kwargs) -> np.ndarray:
        config = Config(num_inference_steps=2, width=PX, height=PX)
        return pixels(flux.generate_images([seed], prompt, config, **kwargs)[0].image)

    return image


def source_image(color) -> Image.Image:
    image = Image.new("RGB", (PX, PX), color)
    image.paste((250, 250, 250), (4, 4, 12, 28))
    return image


def edit(oai, source, mask=None, **extra):
    files = {"image": ("in.png", png_bytes(source), "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", png_bytes(mask), "image/png")
    r = oai.images.edit(**files, prompt="a red fox", extra_body={"seed": 3, **FAST, **extra})
    assert r.size == SIZE
    return pixels(png(r.data[0].b64_json))


def test_openai_edit_without_mask_is_img2img_at_the_default_strength(oai, ref):
    source = source_image((200, 40, 40))
    assert np.array_equal(edit(oai, source), ref(3, image=source, strength=IMG2IMG_STRENGTH))
    assert np.array_equal(edit(oai, source, strength=0.3), ref(3, image=source, strength=0.3))


def test_openai_edit_with_mask_repaints_where_transparent(oai, ref):
    source = source_image((30, 160, 60))
    mask = Image.new("RGBA", (PX, PX), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, PX // 2, PX))  # left half transparent: repaint it
    white_left = Image.new("L", (PX, PX), 0)
    white_left.paste(255, (0, 0, PX // 2, PX))
    want = ref(3, image=source, mask_image=white_left, strength=INPAINT_STRENGTH)
    assert np.array_equal(edit(oai, source, mask), want)


def test_openai_mask_alpha_zero_becomes_white():
    mask = Image.new("RGBA", (4, 1), (9, 9, 9, 255))
    mask.putpixel((1, 0), (9, 9, 9, 0))
    assert np.asarray(openai_mask_to_mflux(mask)).tolist() == [[0, 255, 0, 0]]


def test_openai_errors_have_openai_types(oai, srv):
    with pytest.raises(openai.NotFoundError) as e:
        oai.images.generate(model="shnell", prompt="a fox", size=SIZE)
    assert e.value.body["code"] == "model_not_found" and "schnell" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(prompt="a fox", size="65x64")
    assert e.value.body["param"] == "size" and "multiples of 16" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="1..10"):
        oai.images.generate(prompt="a fox", n=11, size=SIZE)
    with pytest.raises(openai.BadRequestError, match="output_format"):
        oai.images.generate(prompt="a fox", size=SIZE, output_format="jpeg")
    with pytest.raises(openai.BadRequestError, match="not an image"):
        oai.images.edit(image=("in.png", b"not a png at all", "image/png"), prompt="a fox")
    with pytest.raises(openai.BadRequestError, match="alpha channel"):
        rgb = png_bytes(Image.new("RGB", (64, 64)))
        oai.images.edit(image=("a.png", rgb, "image/png"), mask=("m.png", rgb, "image/png"), prompt="a fox")


def test_v1_models_lists_the_store(oai):
    assert sorted(m.id for m in oai.models.list().data) == ["dev", "schnell"]


# --- A1111 ------------------------------------------------------------------------------------------------
def test_a1111_txt2img(a1111):
    r = a1111.txt2img(prompt="a red fox", width=PX, height=PX, seed=11, n_iter=2)
    assert len(r.images) == 2 and r.images[0].size == (PX, PX)
    assert r.info["all_seeds"] == [11, 12] and r.info["seed"] == 11
    assert r.info["infotexts"][1].startswith("a red fox\n") and "Seed: 12" in r.info["infotexts"][1]
    assert any("'Euler a' ignored" in n for n in r.info["notes"])  # webuiapi sends Euler a / automatic
    assert r.images[0].text["parameters"] == r.info["infotexts"][0]


def test_a1111_cfg_scale_is_true_cfg_only_with_a_negative_prompt(a1111, ref):
    # cfg_scale 7 with an empty negative prompt (every A1111 client's default) is plain sampling
    default = a1111.txt2img(prompt="a red fox", width=PX, height=PX, seed=5, cfg_scale=7)
    assert np.array_equal(pixels(default.image), ref(5))
    assert "CFG scale 7 ignored (true CFG needs a negative prompt)" in default.info["notes"]
    cfg = a1111.txt2img(
        prompt="a red fox", negative_prompt="blurry", width=PX, height=PX, seed=5, cfg_scale=3
    )
    assert np.array_equal(pixels(cfg.image), ref(5, negative_prompt="blurry", true_cfg_scale=3.0))
    assert not np.array_equal(pixels(cfg.image), ref(5))


def test_a1111_random_seed_and_raw_and_data_url_images(a1111, srv):
    r = a1111.txt2img(prompt="a red fox", width=PX, height=PX, seed=-1)
    assert 0 <= r.info["seed"] < 2**32
    init = Image.new("RGB", (PX, PX), (20, 20, 200))
    via_client = a1111.img2img(
        images=[init], prompt="a red fox", width=PX, height=PX, seed=4, denoising_strength=0.5
    )
    raw = base64.b64encode(png_bytes(init)).decode()
    body = {
        "prompt": "a red fox",
        "init_images": [raw],
        "width": PX,
        "height": PX,
        "seed": 4,
        "steps": 2,
        "denoising_strength": 0.5,
    }
    direct = requests.post(f"{srv.url}/sdapi/v1/img2img", json=body, timeout=60).json()
    assert np.array_equal(
        pixels(png(direct["images"][0])), pixels(via_client.image)
    )  # data URL == raw base64
    assert json.loads(direct["info"])["denoising_strength"] == 0.5


def test_a1111_inpainting_mask_and_its_invert(a1111, ref):
    init = source_image((20, 20, 200))
    left = Image.new("L", (PX, PX), 0)
    left.paste(255, (0, 0, PX // 2, PX))  # white: repaint the left half
    right = Image.eval(left, lambda v: 255 - v)
    kwargs = dict(
        images=[init], mask_image=left, mask_blur=0, prompt="a red fox", width=PX, height=PX, seed=4
    )
    r = a1111.img2img(**kwargs, denoising_strength=0.9)
    assert np.array_equal(pixels(r.image), ref(4, image=init, mask_image=left, strength=0.9))
    r = a1111.img2img(**kwargs, denoising_strength=0.9, inpainting_mask_invert=1)
    assert np.array_equal(pixels(r.image), ref(4, image=init, mask_image=right, strength=0.9))


def test_a1111_models_options_and_switching(a1111, srv):
    titles = a1111.util_get_model_names()
    assert len(titles) == 2 and all(" [" in t for t in titles)
    dev = next(t for t in titles if t.startswith("dev "))
    a1111.util_set_model(dev, find_closest=False)
    assert a1111.util_get_current_model() == dev
    assert requests.get(f"{srv.url}/health", timeout=10).json()["model"] == "dev"
    forge = {
        "prompt": "a red fox",
        "width": PX,
        "height": PX,
        "seed": 1,
        "steps": 2,
        "distilled_cfg_scale": 2.5,
    }
    image = png(requests.post(f"{srv.url}/sdapi/v1/txt2img", json=forge, timeout=60).json()["images"][0])
    assert image.text["Model"] == "dev" and image.text["Guidance"] == "2.5"  # Forge's field is dev's guidance
    assert (
        a1111.set_options({"sd_model_checkpoint": "schnell"}) is None
    )  # a plain name works as well as the title
    assert a1111.get_options()["sd_model_checkpoint"].startswith("schnell [")
    assert srv.loads[-2:] == [("dev", ()), ("schnell", ())]  # one load each, the old one freed first
    r = requests.post(f"{srv.url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope [123]"}, timeout=10)
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["detail"]


def test_a1111_lists(a1111):
    assert [s["name"] for s in a1111.get_samplers()] == ["Euler"]
    assert [lo["name"] for lo in a1111.get_loras()] == ["ink"]
    assert a1111.get_loras()[0]["path"] == "ink.safetensors"


def test_lora_by_name_only(a1111, srv):
    plain = a1111.txt2img(prompt="a red fox", width=PX, height=PX, seed=2)
    styled = a1111.txt2img(prompt="a red fox <lora:ink:1.0>", width=PX, height=PX, seed=2)
    assert np.abs(pixels(plain.image) - pixels(styled.image)).max() > 0
    assert styled.info["prompt"] == "a red fox"
    tags = {"../ink:1": 400, "/etc/ink": 400, "ghost:1": 404, "ink:1.2.3": 400, "ink:1e999": 400}
    for tag, status in tags.items():
        body = {"prompt": f"fox <lora:{tag}>", "width": PX, "height": PX, "steps": 1}
        r = requests.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=60)
        assert r.status_code == status and "Traceback" not in r.text, tag
    oai_bad = {"prompt": "fox", "size": SIZE, "loras": [{"name": "../../x"}]}
    assert requests.post(f"{srv.url}/v1/images/generations", json=oai_bad, timeout=60).status_code == 400
    a1111.txt2img(prompt="a red fox", width=PX, height=PX, seed=2)  # back to the model without LoRAs


# --- the queue ----------------------------------------------------------------------------------------------
def test_ten_clients_all_served_in_order_then_429(srv, oai):
    srv.gate.clear()
    results, errors = {}, []

    def client(i):
        try:
            c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
            results[i] = c.images.generate(
                prompt=f"client {i}", size=SIZE, extra_body={"seed": i, "steps": 1}
            )
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(11)]
    del srv.order[:]
    try:
        for t in threads[:10]:
            t.start()
        wait_for(lambda: srv.server.worker.job_count() == 10, "ten jobs")
        threads[10].start()
        wait_for(lambda: srv.server.worker.queued() == 10, "a full queue")
        queued = [srv.server.worker.current.prompt] + [j.prompt for j in srv.server.worker._queue]
        with pytest.raises(openai.RateLimitError) as e:
            oai.images.generate(prompt="one too many", size=SIZE, extra_body={"steps": 1})
        assert int(e.value.response.headers["Retry-After"]) >= 1 and e.value.body["code"] == "queue_full"
    finally:
        srv.gate.set()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 11
    assert srv.order == queued  # first in, first out
    for i, r in results.items():
        assert png(r.data[0].b64_json).text["Seed"] == str(i)


def test_cancel_queued_and_running_jobs(srv):
    srv.gate.clear()
    body = {"prompt": "cancel me", "width": PX, "height": PX, "steps": 1, "previews": False}
    streams = [
        requests.post(f"{srv.url}/mflux/v1/generate", json=body, stream=True, timeout=60) for _ in range(2)
    ]
    # one line iterator per stream, kept: dropping one closes its connection, which cancels its job
    lines = [s.iter_lines(decode_unicode=True, delimiter="\n\n") for s in streams]
    try:
        ids = [json.loads(next(it).split("data: ", 1)[1])["job_id"] for it in lines]
        wait_for(
            lambda: srv.server.worker.current is not None and srv.server.worker.queued() == 1,
            "one running, one queued",
        )
        for job_id in reversed(ids):  # the queued one, then the running one
            assert requests.delete(f"{srv.url}/mflux/v1/jobs/{job_id}", timeout=10).json() == {
                "cancelled": job_id
            }
    finally:
        srv.gate.set()
    for it in lines:
        events = [block for block in it if block]
        assert events[-1].startswith("event: end") and '"status": "cancelled"' in events[-1]
        assert not any(e.startswith("event: image") for e in events)
    assert requests.delete(f"{srv.url}/mflux/v1/jobs/{ids[0]}", timeout=10).status_code == 404


def test_a1111_progress_and_interrupt(srv, a1111):
    srv.gate.clear()
    out = {}
    t = threading.Thread(
        target=lambda: out.setdefault("r", a1111.txt2img(prompt="stop me", width=PX, height=PX, batch_size=3))
    )
    try:
        t.start()
        wait_for(lambda: a1111.get_progress()["state"]["job_count"] == 1, "the job")
        progress = a1111.get_progress()
        assert set(progress["state"]) >= {"job_count", "sampling_step", "sampling_steps", "interrupted"}
        a1111.interrupt()
        assert a1111.get_progress()["state"]["interrupted"] is True
    finally:
        srv.gate.set()
    t.join(timeout=60)
    r = out["r"]
    assert r.info["interrupted"] is True and len(r.images) < 3
    wait_for(lambda: a1111.get_progress()["state"]["job_count"] == 0, "an idle server")


class Previews:
    """A real Flux1 that records the steps that came with a preview, and can hold a job at its first one."""

    def __init__(self, flux):
        self._flux, self.steps = flux, []
        self.hold, self.held = threading.Event(), threading.Event()
        self.hold.set()

    def __getattr__(self, name):
        return getattr(self._flux, name)

    def generate(self, *args, **kwargs):
        from mflux.flux1 import StepEvent

        self.steps = []
        for event in self._flux.generate(*args, **kwargs):
            yield event  # the worker has taken the step (and its preview) when this returns
            if isinstance(event, StepEvent) and event.previews:
                self.steps.append(event.step)
                if not self.hold.is_set():
                    self.held.set()
                    self.hold.wait(timeout=30)


def test_a1111_progress_shows_previews_at_show_progress_every_n_steps(srv):
    flux = {}  # srv: the store holds schnell; this test's server has its options and its model to itself

    def loader(name, loras):
        return flux.setdefault(name, Previews(_load_flux(name, loras)))

    with serving(ServerSettings(model="schnell"), loader) as (url, _):

        def previewed(steps: int, **body) -> list[int]:
            body = {"prompt": "a red fox", "width": PX, "height": PX, "seed": 1, "steps": steps, **body}
            r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return flux["schnell"].steps

        # unset: about five previews an image (A1111's default of 10 would give schnell's 4 steps none)
        assert previewed(10) == [2, 4, 6, 8, 10], "no previews for an A1111 job"
        assert previewed(7, override_settings={"show_progress_every_n_steps": 3}) == [3, 6]
        assert previewed(3, override_settings={"show_progress_every_n_steps": 0}) == [1, 2, 3]  # each step
        assert previewed(3, override_settings={"live_previews_enable": False}) == []
        r = requests.post(f"{url}/sdapi/v1/options", json={"show_progress_every_n_steps": -1}, timeout=10)
        assert r.status_code == 200 and previewed(3) == []  # the option holds for later requests
        options = requests.get(f"{url}/sdapi/v1/options", timeout=10).json()
        assert options["show_progress_every_n_steps"] == -1 and options["live_previews_enable"] is True
        assert previewed(4, override_settings={"show_progress_every_n_steps": 2}) == [2, 4]  # overrides win
        bad = {"prompt": "fox", "override_settings": {"show_progress_every_n_steps": "often"}}
        r = requests.post(f"{url}/sdapi/v1/txt2img", json=bad, timeout=10)
        detail = r.json()["detail"]
        assert r.status_code == 400 and "show_progress_every_n_steps must be a whole number" in detail
        r = requests.post(f"{url}/sdapi/v1/options", json={"show_progress_every_n_steps": 1}, timeout=10)
        assert r.status_code == 200

        # while the job runs, /progress returns the latest preview as A1111 does: a base64 PNG
        flux["schnell"].hold.clear()
        job = threading.Thread(target=previewed, args=(3,))
        job.start()
        try:
            assert flux["schnell"].held.wait(timeout=30), "the job never reached its first preview"
            progress = requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()
            skipped = requests.get(f"{url}/sdapi/v1/progress?skip_current_image=true", timeout=10).json()
        finally:
            flux["schnell"].hold.set()
            job.join(timeout=60)
        assert progress["current_image"], "no current_image while an A1111 job runs"
        image = png(progress["current_image"])
        assert (image.format, image.size) == ("PNG", (PX, PX))
        assert progress["state"]["sampling_step"] == 1 and skipped["current_image"] is None


def test_a_client_that_goes_away_cancels_its_job(srv, caplog):
    srv.gate.clear()
    body = {"prompt": "nobody waits", "size": SIZE, "steps": 1}
    try:
        with caplog.at_level(logging.INFO, logger="mflux.server"):
            with pytest.raises(requests.exceptions.ReadTimeout):
                requests.post(f"{srv.url}/v1/images/generations", json=body, timeout=(5, 0.5))
            wait_for(
                lambda: srv.server.worker.current and srv.server.worker.current.cancelled.is_set(),
                "the cancel",
            )
            srv.gate.set()
            wait_for(lambda: srv.server.worker.job_count() == 0, "an idle worker")
    finally:
        srv.gate.set()
    assert any("status=cancelled" in r.getMessage() for r in caplog.records if r.name == "mflux.server")


def test_timeout(srv, oai):
    srv.gate.clear()
    srv.server.settings.timeout = 0.3
    try:
        t = threading.Timer(0.8, srv.gate.set)
        t.start()
        with pytest.raises(openai.APIStatusError) as e:
            oai.images.generate(prompt="too slow", size=SIZE, extra_body={"steps": 1})
        assert e.value.status_code == 504 and "timed out after 0.3 s" in e.value.body["message"]
    finally:
        srv.server.settings.timeout = 600.0
        srv.gate.set()


def test_one_log_line_per_request(oai, caplog):
    with caplog.at_level(logging.INFO, logger="mflux.server"):
        oai.images.generate(prompt="logged", size=SIZE, extra_body={"seed": 1, "steps": 1})
    lines = [
        r.getMessage() for r in caplog.records if r.name == "mflux.server" and "size=32x32" in r.getMessage()
    ]
    assert len(lines) == 1
    line = lines[0]
    for part in ("model=schnell", "size=32x32", "steps=1", "queued=", "generating=", "status=ok"):
        assert part in line


# --- limits and bad input ---------------------------------------------------------------------------------
def test_limits_are_named(srv):
    gen = f"{srv.url}/v1/images/generations"
    r = requests.post(gen, json={"prompt": "x" * 5000, "size": SIZE}, timeout=10)
    assert r.status_code == 400 and "limit is 4000" in r.json()["error"]["message"]
    r = requests.post(gen, json={"prompt": "fox", "size": "4096x4096"}, timeout=10)
    assert r.status_code == 400 and "at most 4194304 pixels" in r.json()["error"]["message"]
    r = requests.post(
        f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "fox", "batch_size": 6, "n_iter": 2}, timeout=10
    )
    assert r.status_code == 400 and "1..10" in r.json()["detail"]
    limits = srv.server.limits
    body, upload = limits.body_bytes, limits.upload_bytes
    limits.body_bytes, limits.upload_bytes = 4000, 2000
    try:
        r = requests.post(gen, json={"prompt": "x" * 5000}, timeout=10)
        assert r.status_code == 413 and "MiB limit" in r.json()["error"]["message"]
        chunked = requests.post(
            gen,
            data=iter([b'{"prompt": "', b"x" * 3000, b"x" * 3000, b'"}']),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert (
            chunked.status_code == 413 and "MiB limit" in chunked.text
        )  # no Content-Length: counted while reading
        limits.body_bytes = 100_000
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        r = requests.post(
            f"{srv.url}/v1/images/edits",
            files={"image": ("a.png", png_bytes(noise), "image/png")},
            data={"prompt": "fox"},
            timeout=10,
        )
        assert r.status_code == 413 and "upload limit" in r.json()["error"]["message"]
    finally:
        limits.body_bytes, limits.upload_bytes = body, upload


def test_bad_input_gets_one_clear_error_and_the_server_keeps_serving(srv):
    cases = [
        (
            "/v1/images/generations",
            {"data": "{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("/v1/images/generations", {"data": "[]"}, 400, "JSON object"),
        ("/v1/images/generations", {"json": {"size": SIZE}}, 400, "prompt"),
        ("/sdapi/v1/img2img", {"json": {"prompt": "fox", "init_images": ["%%%"]}}, 400, "not valid base64"),
        (
            "/sdapi/v1/img2img",
            {"json": {"prompt": "fox", "init_images": ["data:image/png"]}},
            400,
            "not an image",
        ),
        (
            "/sdapi/v1/img2img",
            {"json": {"prompt": "fox", "init_images": [base64.b64encode(b"hello").decode()]}},
            400,
            "not an image",
        ),
        (
            "/sdapi/v1/txt2img",
            {"json": {"prompt": "fox", "override_settings": {"sd_model_checkpoint": "nope"}}},
            404,
            "unknown model",
        ),
        ("/v1/nowhere", {"json": {}}, 404, "no route"),
    ]
    for path, kwargs, status, text in cases:
        r = requests.post(f"{srv.url}{path}", timeout=10, **kwargs)
        assert r.status_code == status, (path, r.text)
        assert text in r.text and "Traceback" not in r.text
        err = r.json()
        if path.startswith("/sdapi"):
            assert set(err) == {"error", "detail", "body", "errors"}
        else:
            assert set(err["error"]) == {"message", "type", "param", "code"}
    health = requests.get(f"{srv.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["queue"] == 0 and health["backend"] == "cpu"
    assert health["model"] == "schnell"


# --- the API key ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(srv):
    loads = []
    with serving(ServerSettings(api_key="sekrit"), loader=lambda name, loras: loads.append(name)) as (
        url,
        server,
    ):
        yield SimpleNamespace(url=url, server=server, loads=loads)


def test_api_key_on_every_route_but_health(keyed):
    url = keyed.url
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/sdapi/v1/sd-models", "/mflux/v1/jobs/x", "/outputs/x.png", "/ui/app.js"):
        assert requests.get(f"{url}{path}", timeout=10).status_code == 401, path
    body = {"prompt": "fox", "size": SIZE, "model": "schnell"}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic " + base64.b64encode(b"u:sekrit").decode()},
    ):
        r = requests.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "fox"}, auth=("u", "wrong"), timeout=10)
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    assert keyed.loads == [] and keyed.server.worker.job_count() == 0  # refused requests did no work

    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
    assert sorted(m.id for m in good.models.list().data) == ["dev", "schnell"]
    host, port = url.removeprefix("http://").split(":")
    client = webuiapi.WebUIApi(host=host, port=int(port), username="anyone", password="sekrit")
    assert len(client.get_sd_models()) == 2

    page = requests.get(f"{url}/", timeout=10)
    assert page.status_code == 401 and "mflux_api_key" in page.text  # the page asks for the key
    assert requests.get(f"{url}/", cookies={"mflux_api_key": "sekrit"}, timeout=10).status_code == 200


def test_the_readmes_curl_commands(srv, tmp_path):
    # The curl commands of the README's serving page, docs/serve.md.
    page = (Path(__file__).parents[1] / "docs" / "serve.md").read_text()
    block = page.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = block.replace("\\\n", " ").replace("|\n", "| ").strip().splitlines()
    assert len(commands) == 3 and all(c.startswith("curl ") for c in commands)
    source = source_image((90, 90, 200))
    (tmp_path / "photo.png").write_bytes(png_bytes(source))
    (tmp_path / "mask.png").write_bytes(png_bytes(Image.new("RGBA", source.size, (0, 0, 0, 0))))
    for command in commands:
        # the same requests at the tests' size: the tiny model is slow only at real sizes
        small = (
            command.replace("http://127.0.0.1:7860", srv.url)
            .replace("1024x768", SIZE)
            .replace("768", str(PX))
        )
        subprocess.run(
            ["bash", "-c", "set -eo pipefail; " + small],
            cwd=tmp_path,
            check=True,
            timeout=120,
            env={**os.environ, "MFLUX_API_KEY": ""},
        )
    assert [Image.open(tmp_path / f"out{i}.png").text["Seed"] for i in range(2)] == ["7", "8"]
    assert len(json.loads((tmp_path / "edit.json").read_text())["data"]) == 1
    a1111 = json.loads((tmp_path / "a1111.json").read_text())
    assert len(a1111["images"]) == 1 and json.loads(a1111["info"])["prompt"] == "a lighthouse at dusk"


# --- the command ------------------------------------------------------------------------------------------
def test_serve_warns_on_an_open_bind_without_a_key(monkeypatch):
    from mflux.cli import cli
    from mflux.server import listen, serve

    calls = []
    # the warning is what is tested, not the ports: another process may hold 7860 or 9999
    monkeypatch.setattr(serve, "check_port", lambda host, port: None)
    monkeypatch.setattr(
        listen,
        "uvicorn_server",
        lambda app, host, port: SimpleNamespace(run=lambda: calls.append((host, port))),
    )
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "9999"])
    assert r.exit_code == 0 and "warning: serving on 0.0.0.0 without --api-key" in r.output
    assert calls == [("0.0.0.0", 9999)]
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--api-key", "k"])
    assert "warning" not in r.output
    r = CliRunner().invoke(cli, ["serve"])
    assert "warning" not in r.output
    r = CliRunner().invoke(cli, ["serve", "--model", "nope"])
    assert r.exit_code == 1 and "error:" in r.output and len(calls) == 3


def test_limits_defaults_allow_ten_queued():
    assert ServerSettings().queue >= 10 and Limits().n == 10
