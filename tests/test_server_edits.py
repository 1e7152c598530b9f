"""`mflux serve` with kontext and fill models (issue 31 item 8): each cell of docs/serve.md's edit table,
through OpenAI's SDK and A1111's HTTP API, against the Python API on the same store models.

Kontext's preferred resolutions are about a megapixel, slow on a CPU: here they are 32 px ones, and the
server runs in this process, so its `kontext_size` and the reference's resize use them too."""

import base64
import json
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import requests
from PIL import Image

import mflux.flux1
from mflux import Config, Flux1
from mflux.server.core import ApiError, ServerSettings
from tests.fixtures import store_hf_folder
from tests.server_harness import module_store, pixels, png, png_bytes, serving

SMALL_RESOLUTIONS = [(48, 32), (32, 48), (32, 32)]
PX = 32
STEPS = 2  # fill's own default is 50


@pytest.fixture(scope="module")
def mflux_home(tmp_path_factory):
    yield from module_store(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(mflux_home, tiny_schnell, tiny_kontext, tiny_fill):
    store_hf_folder(tiny_schnell, "schnell")
    store_hf_folder(tiny_kontext, "kontext")
    store_hf_folder(tiny_fill, "fill")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mflux.flux1, "KONTEXT_RESOLUTIONS", SMALL_RESOLUTIONS)
        with serving(ServerSettings(model="schnell")) as (url, server):
            yield SimpleNamespace(url=url, server=server)


@pytest.fixture(scope="module")
def ref(srv):
    """The Python API on the store's models, in this process: what the server must reproduce."""
    models = {}

    def image(model, seed, prompt="a red fox", size=(PX, PX), **kwargs) -> np.ndarray:
        flux = models.setdefault(model, Flux1.from_name(model))
        config = Config(num_inference_steps=STEPS, width=size[0], height=size[1])
        return pixels(flux.generate_images([seed], prompt, config, **kwargs)[0].image)

    return image


@pytest.fixture
def oai(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


def photo(size=(PX, PX)) -> Image.Image:
    image = Image.new("RGB", size, (200, 40, 40))
    image.paste((250, 250, 250), (4, 4, 12, size[1] - 4))
    return image


def left_half(size=(PX, PX)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # white: repaint the left half
    return mask


def transparent_left(size=(PX, PX)) -> Image.Image:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))  # OpenAI repaints where transparent
    return mask


def openai_edit(oai, model, source, mask=None, **extra):
    files = {"image": ("in.png", png_bytes(source), "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", png_bytes(mask), "image/png")
    return oai.images.edit(
        model=model, **files, prompt="a red fox", extra_body={"seed": 3, "steps": STEPS, **extra}
    )


def a1111_img2img(srv, model, source, mask=None, **fields):
    body = {
        "prompt": "a red fox",
        "init_images": [base64.b64encode(png_bytes(source)).decode()],
        "seed": 4,
        "steps": STEPS,
        "override_settings": {"sd_model_checkpoint": model},
        **fields,
    }
    if mask is not None:
        body["mask"] = base64.b64encode(png_bytes(mask)).decode()
        body["mask_blur"] = 0
    return requests.post(f"{srv.url}/sdapi/v1/img2img", json=body, timeout=60)


# --- OpenAI /v1/images/edits ------------------------------------------------------------------------------
def test_openai_edit_on_kontext_is_an_instruction_edit_at_the_references_aspect(oai, ref):
    source = photo((40, 30))  # wider than tall: the 48x32 resolution
    r = openai_edit(oai, "kontext", source)
    assert r.size == "48x32"
    shown = png(r.data[0].b64_json)
    assert json.loads(shown.text["mflux"])["variant"] == "kontext"
    assert np.array_equal(pixels(shown), ref("kontext", 3, size=(48, 32), image=source))


def test_openai_edit_on_kontext_refuses_a_mask_and_a_strength(oai):
    with pytest.raises(openai.BadRequestError) as e:
        openai_edit(oai, "kontext", photo(), transparent_left())
    assert e.value.body["param"] == "mask" and "use a fill model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="takes no strength"):
        openai_edit(oai, "kontext", photo(), strength=0.5)


def test_openai_edit_on_fill_needs_a_mask(oai):
    with pytest.raises(openai.BadRequestError) as e:
        openai_edit(oai, "fill", photo())
    assert e.value.body["message"].startswith("fill is a fill model: it needs a mask")


def test_openai_edit_on_fill_with_a_mask_inpaints(oai, ref):
    r = openai_edit(oai, "fill", photo(), transparent_left())
    assert r.size == f"{PX}x{PX}"
    want = ref("fill", 3, image=photo(), mask_image=left_half())  # strength: FluxFillPipeline's 1.0
    assert np.array_equal(pixels(png(r.data[0].b64_json)), want)


# --- A1111 /sdapi/v1/img2img ------------------------------------------------------------------------------
def test_a1111_img2img_on_kontext_is_an_instruction_edit_noting_the_strength(srv, ref):
    source = photo((30, 40))  # taller than wide, no size sent: the 32x48 resolution
    r = a1111_img2img(srv, "kontext", source, denoising_strength=0.75)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (32, 48, None)
    assert "denoising_strength ignored: a kontext model edits by instruction" in info["notes"]
    want = ref("kontext", 4, size=(32, 48), image=source)
    assert np.array_equal(pixels(png(r.json()["images"][0])), want)


def test_a1111_img2img_on_kontext_refuses_a_mask(srv):
    r = a1111_img2img(srv, "kontext", photo(), left_half(), width=PX, height=PX)
    assert r.status_code == 400 and "use a fill model" in r.json()["detail"]


def test_a1111_img2img_on_fill_needs_a_mask(srv):
    r = a1111_img2img(srv, "fill", photo(), width=PX, height=PX)
    assert r.status_code == 400 and "it needs a mask" in r.json()["detail"]


def test_a1111_inpaint_on_fill_takes_the_strength_only_when_sent(srv, ref):
    unsent = a1111_img2img(srv, "fill", photo(), left_half())  # no size: the image's
    assert unsent.status_code == 200, unsent.text
    assert json.loads(unsent.json()["info"])["denoising_strength"] == 1.0  # not A1111's default 0.75
    want = ref("fill", 4, image=photo(), mask_image=left_half())
    assert np.array_equal(pixels(png(unsent.json()["images"][0])), want)
    sent = a1111_img2img(srv, "fill", photo(), left_half(), denoising_strength=0.5, width=PX, height=PX)
    want = ref("fill", 4, image=photo(), mask_image=left_half(), strength=0.5)
    assert np.array_equal(pixels(png(sent.json()["images"][0])), want)


# --- the page's API ----------------------------------------------------------------------------------------
def events(response) -> list[tuple[str, dict]]:
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def test_the_page_api_inpaints_with_a_painted_mask_on_fill(srv, ref):
    stroke = Image.new("RGBA", (PX, PX), (0, 0, 0, 0))  # white paint on a transparent canvas
    stroke.paste((255, 255, 255, 255), (0, 0, PX // 2, PX))
    body = {"prompt": "a red fox", "model": "fill", "seed": "4", "steps": STEPS, "previews": False}
    r = requests.post(
        f"{srv.url}/mflux/v1/generate",
        json={**body, "image": data_url(photo()), "mask": data_url(stroke)},
        timeout=60,
    )
    got = events(r)
    image = next((data for kind, data in got if kind == "image"), None)
    assert image, got
    want = ref("fill", 4, image=photo(), mask_image=left_half())
    assert np.array_equal(pixels(png(image["png"])), want)


def test_the_page_api_checks_the_image_and_mask_before_queueing(srv):
    def post(**fields):
        body = {"prompt": "a red fox", "steps": STEPS, **fields}
        return requests.post(f"{srv.url}/mflux/v1/generate", json=body, timeout=10)

    r = post(model="fill", mask=data_url(left_half()))
    assert r.status_code == 400 and r.json()["error"]["message"] == "mask needs the image it masks (image)"
    r = post(model="fill", image=data_url(photo()), mask=data_url(left_half((48, 32))))
    assert r.status_code == 400 and "mask is 48x32 but image is 32x32" in r.json()["error"]["message"]
    r = post(model="fill", image=data_url(photo()))
    assert r.status_code == 400 and "needs a mask" in r.json()["error"]["message"]
    r = post(model="kontext", image=data_url(photo()), strength=0.5)
    assert r.status_code == 400 and "takes no strength" in r.json()["error"]["message"]


def test_text_to_image_on_fill_is_refused_before_queueing(oai, srv, monkeypatch):
    queued = []

    def submit(job):
        queued.append(job)
        raise ApiError(409, "queued (the test stops it here)")

    monkeypatch.setattr(srv.server, "submit", submit)
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(model="fill", prompt="a red fox", size=f"{PX}x{PX}", extra_body={"steps": STEPS})
    assert e.value.body["message"].startswith("fill is a fill model: it repaints the masked area of an image")
    body = {"prompt": "a red fox", "width": PX, "height": PX, "steps": STEPS}
    a1111 = {**body, "override_settings": {"sd_model_checkpoint": "fill"}}
    r = requests.post(f"{srv.url}/sdapi/v1/txt2img", json=a1111, timeout=10)
    assert r.status_code == 400 and "is a fill model" in r.json()["detail"]
    r = requests.post(f"{srv.url}/mflux/v1/generate", json={**body, "model": "fill"}, timeout=10)
    assert r.status_code == 400 and "is a fill model" in r.json()["error"]["message"]
    assert queued == []  # refused before the fill model would load


# --- which models edit -------------------------------------------------------------------------------------
def test_model_lists_say_what_each_model_edits(oai, srv):
    listed = {m.id: m.model_extra["mflux"] for m in oai.models.list().data}
    assert listed == {
        "schnell": {"variant": "schnell", "edits": ["img2img", "inpaint"]},
        "kontext": {"variant": "kontext", "edits": ["instruction"]},
        "fill": {"variant": "fill", "edits": ["inpaint"]},
    }
    a1111 = {m["model_name"]: m["mflux"] for m in requests.get(f"{srv.url}/sdapi/v1/sd-models").json()}
    assert a1111 == listed
