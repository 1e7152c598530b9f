"""The web page in a real headless browser (Debian's chromium, driven by Playwright; no browser download).

Every request the page makes must go to the loopback server: any other address fails the test.
MFLUX_SCREENSHOT=docs/serve.png writes the README's screenshot (else it goes to a temporary folder).
"""

import base64
import io
import json
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import openai
import pytest
import requests
from PIL import Image, PngImagePlugin

import mflux.flux1
from mflux.server.core import ServerSettings
from mflux.server.worker import _load_flux
from tests.fixtures import store_hf_folder
from tests.server_harness import Gate, module_store, serving, wait_for, write_lora

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SEED = str(2**64 - 2)  # above 2**53: a JavaScript number would round it to 2**64
PROMPT = "a lighthouse at dusk"

# Records what the page shows as it changes: the status line's texts and each new step preview.
WATCH = """
window.__seen = {messages: [], previews: 0};
new MutationObserver(() => {
  const m = document.getElementById("message");
  if (m && window.__seen.messages.at(-1) !== m.textContent) window.__seen.messages.push(m.textContent);
}).observe(document, {subtree: true, childList: true, characterData: true});
new MutationObserver((records) => {
  for (const r of records) if (r.target.id === "preview" && r.attributeName === "src") window.__seen.previews++;
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["src"]});
"""

DROP = """async ([data, name]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const files = new DataTransfer();
  files.items.add(new File([bytes], name, {type: "image/png"}));
  document.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
}"""


@pytest.fixture(scope="module")
def mflux_home(tmp_path_factory):
    yield from module_store(tmp_path_factory)


@pytest.fixture(scope="module")
def ui(mflux_home, tiny_schnell, tiny_fill, tiny_kontext, tmp_path_factory):
    store_hf_folder(tiny_schnell, "schnell")
    store_hf_folder(tiny_fill, "fill")
    store_hf_folder(tiny_kontext, "kontext")
    loras = tmp_path_factory.mktemp("loras")
    write_lora(loras, tiny_schnell)
    gate = threading.Event()
    gate.set()
    settings = ServerSettings(model="schnell", lora_dir=loras)
    with pytest.MonkeyPatch.context() as mp:
        # Kontext's trained resolutions are about a megapixel, slow on a CPU: small ones, for this
        # in-process server's size choice and reference resize
        mp.setattr(mflux.flux1, "KONTEXT_RESOLUTIONS", [(48, 32), (32, 48), (32, 32)])
        with serving(settings, lambda n, lo: Gate(_load_flux(n, lo), gate, [])) as (url, _):
            yield url, gate


@pytest.fixture(scope="module")
def new_page():
    """Pages of one headless chromium; any request a page makes off this machine fails the module."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt-get install chromium)"
    outside = []

    def only_loopback(route):
        url = urlparse(route.request.url)
        if url.scheme in ("data", "blob") or url.hostname in ("127.0.0.1", "localhost", "::1"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)

        def make():
            context = browser.new_context(viewport={"width": 1000, "height": 640})
            context.route("**/*", only_loopback)
            context.add_init_script(WATCH)
            return context.new_page()

        yield make
        browser.close()
    assert outside == [], f"the page made requests off this machine: {outside}"


@pytest.fixture(scope="module")
def page(ui, new_page):
    page = new_page()
    page.goto(ui[0] + "/")
    page.wait_for_function("document.querySelector('#model').value === 'schnell'")
    return page


def fill_form(page, prompt=PROMPT, seed=SEED):
    page.fill("#prompt", prompt)
    page.fill("#negative_prompt", "")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "2")
    page.fill("#seed", seed)  # typing a seed unticks "random"


def data_url_png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_generate_shows_progress_then_the_apis_image(page, ui, tmp_path):
    fill_form(page)
    assert not page.is_checked("#random_seed")
    page.click("#generate")
    page.wait_for_selector("figure.result img")
    page.wait_for_function("document.querySelector('#message').textContent === 'done'")
    seen = page.evaluate("window.__seen")
    assert "step 1 of 2" in seen["messages"] and "step 2 of 2" in seen["messages"]
    assert seen["previews"] == 2  # a live preview at each step
    assert page.evaluate("document.querySelector('#progress').value") == 1

    img = page.locator("figure.result img").first
    shown = data_url_png(img.get_attribute("src"))
    assert img.get_attribute("data-seed") == SEED and shown.text["Seed"] == SEED
    assert page.locator("figure.result .download").first.get_attribute("download") == f"mflux-{SEED}.png"
    assert page.locator("figure.result .download").first.get_attribute("href") == img.get_attribute("src")

    api = openai.OpenAI(base_url=f"{ui[0]}/v1", api_key="unused", max_retries=0)
    r = api.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": int(SEED), "steps": 2})
    same = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert np.array_equal(np.asarray(shown), np.asarray(same))

    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=os.environ.get("MFLUX_SCREENSHOT") or str(tmp_path / "serve.png"), full_page=True)


def test_use_these_settings_again(page):
    page.fill("#prompt", "something else")
    page.fill("#seed", "")
    page.fill("#steps", "9")
    page.locator("figure.result .reuse").first.click()
    assert page.input_value("#prompt") == PROMPT
    assert page.input_value("#seed") == SEED and not page.is_checked("#random_seed")
    assert page.input_value("#steps") == "2"


def test_dropping_a_png_loads_its_settings(page):
    info = PngImagePlugin.PngInfo()
    params = (
        "a castle on a hill\nNegative prompt: blurry\n"
        "Steps: 7, Sampler: Euler a, CFG scale: 7, Seed: 123456789012345678, Size: 48x80, Model: schnell"
    )
    info.add_text("parameters", params)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    page.evaluate(DROP, [base64.b64encode(buf.getvalue()).decode(), "a1111.png"])
    page.wait_for_function("document.querySelector('#message').textContent === 'settings loaded'")
    got = {
        f: page.input_value(f"#{f}")
        for f in ("prompt", "negative_prompt", "steps", "seed", "width", "height")
    }
    assert got == {
        "prompt": "a castle on a hill",
        "negative_prompt": "blurry",
        "steps": "7",
        "seed": "123456789012345678",
        "width": "48",
        "height": "80",
    }

    mflux_png = page.locator("figure.result img").first.get_attribute("src").split(",", 1)[1]
    page.evaluate("document.querySelector('#message').textContent = ''")
    page.evaluate(DROP, [mflux_png, "mflux.png"])
    page.wait_for_function("document.querySelector('#message').textContent === 'settings loaded'")
    assert (page.input_value("#prompt"), page.input_value("#seed")) == (PROMPT, SEED)
    assert (page.input_value("#width"), page.input_value("#steps")) == ("64", "2")


def test_loras_and_img2img_from_the_form(page, tmp_path):
    fill_form(page, seed="9")
    page.check("[data-lora=ink]")
    page.locator(".lora input[type=number]").fill("0.5")
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source)
    page.set_input_files("#init_image", str(source))
    page.wait_for_function("!document.querySelector('#init_preview').hidden")
    page.fill("#strength", "0.4")
    results = page.locator("figure.result").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('figure.result').length === {results + 1}")
    made = json.loads(
        data_url_png(page.locator("figure.result img").first.get_attribute("src")).text["mflux"]
    )
    assert [Path(p).name for p in made["lora_paths"]] == ["ink.safetensors"] and made["lora_scales"] == [0.5]
    assert made["strength"] == 0.4 and made["seed"] == 9
    # back to plain text-to-image for the tests after this one
    page.uncheck("[data-lora=ink]")
    page.set_input_files("#init_image", [])
    page.wait_for_function("document.querySelector('#init_preview').hidden")


def test_the_page_says_queued_then_running_and_the_servers_queue(page, ui, new_page):
    gate = ui[1]
    second = new_page()
    second.goto(ui[0] + "/")
    second.wait_for_function("document.querySelector('#model').value === 'schnell'")
    for p, prompt, seed in ((page, "runs first", "3"), (second, "waits its turn", "4")):
        fill_form(p, prompt, seed)
        p.fill("#steps", "1")
    gate.clear()  # the first job is taken by the worker, then held before its first step
    try:
        page.click("#generate")
        wait_for(lambda: page.text_content("#message") == "running…", "the page to say its job runs", 10)
        second.click("#generate")
        wait_for(lambda: second.text_content("#message") == "queued, position 1", "queued, position 1", 10)
        busy = "· 1 running · 1 queued"
        wait_for(lambda: second.text_content("#status").endswith(busy), "the header to show the queue", 10)
    finally:
        gate.set()
    both_done = lambda: all(p.text_content("#message") == "done" for p in (page, second))  # noqa: E731
    wait_for(both_done, "both jobs to finish")
    idle = "· 0 running · 0 queued"
    wait_for(lambda: second.text_content("#status").endswith(idle), "an idle header", 10)
    second.close()


def test_previews_every_few_steps_not_every_step(page):
    fill_form(page, seed="6")
    for field, value in (("#steps", "10"), ("#width", "32"), ("#height", "32")):
        page.fill(field, value)
    previews = page.evaluate("window.__seen.previews")
    results = page.locator("figure.result").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('figure.result').length === {results + 1}")
    page.wait_for_function("document.querySelector('#message').textContent === 'done'")
    assert "step 10 of 10" in page.evaluate("window.__seen.messages")
    shown = page.evaluate("window.__seen.previews") - previews
    assert shown == 5, f"{shown} previews for 10 steps; expected 5, at steps 2, 4, 6, 8 and 10"


def test_cancel_button(page, ui):
    gate = ui[1]
    results = page.locator("figure.result").count()
    fill_form(page, prompt="never drawn", seed="5")
    gate.clear()
    try:
        page.click("#generate")
        page.wait_for_function("currentJob !== null")  # the page knows its job's id
        page.click("#cancel")
    finally:
        gate.set()
    page.wait_for_function("!document.querySelector('#generate').disabled")
    assert page.text_content("#message") == "cancelled"
    assert page.locator("figure.result").count() == results


def page_png(src: str) -> bytes:
    assert src.startswith("data:image/png;base64,")
    return base64.b64decode(src.split(",", 1)[1])


def api_png(url: str, body: dict) -> bytes:
    """The image the page's API returns for `body` (one image): the page's own request, sent again."""
    r = requests.post(f"{url}/mflux/v1/generate", json=body, timeout=60)
    for block in r.text.strip().split("\n\n"):
        kind, data = (line.split(": ", 1)[1] for line in block.split("\n"))
        if kind == "image":
            return base64.b64decode(json.loads(data)["png"])
    raise AssertionError(f"no image in {r.text[-300:]}")


def same_image(shown: bytes, api: bytes) -> bool:
    """The same pixels and settings: only the run's own measures (timings, memory peaks) may differ."""
    a, b = Image.open(io.BytesIO(shown)), Image.open(io.BytesIO(api))

    def settings(image):
        made = json.loads(image.text["mflux"])
        return {k: v for k, v in made.items() if not any(w in k for w in ("timing", "seconds", "peak"))}

    return np.array_equal(np.asarray(a), np.asarray(b)) and settings(a) == settings(b)


def drag(page, points):
    """One brush stroke through `points`, fractions (x, y) of the mask canvas's box."""
    box = page.locator("#mask_canvas").bounding_box()
    at = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for p in at[1:]:
        page.mouse.move(*p, steps=4)
    page.mouse.up()


def painted_mask(page) -> np.ndarray | None:
    url = page.evaluate("maskDataUrl()")
    return None if url is None else np.asarray(Image.open(io.BytesIO(page_png(url))).convert("L"))


def run_and_capture(page) -> dict:
    """Generate, wait for the new result, and return the request's JSON body."""
    results = page.locator("figure.result").count()
    with page.expect_request("**/mflux/v1/generate") as request:
        page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('figure.result').length === {results + 1}")
    page.wait_for_function("document.querySelector('#message').textContent === 'done'")
    return json.loads(request.value.post_data)


def test_mask_painter_inpaints_on_a_fill_model(page, ui, tmp_path):
    page.select_option("#model", "fill")
    assert page.text_content("#image_legend").startswith("Inpaint (fill)")
    assert page.input_value("#strength") == "1"  # FluxFillPipeline's default
    fill_form(page, prompt="a red vintage car", seed="12")
    source = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (40, 90, 200)).save(source)
    page.set_input_files("#init_image", str(source))
    page.wait_for_function("!document.querySelector('#mask_canvas').hidden")
    assert painted_mask(page) is None  # nothing painted yet

    page.fill("#brush_size", "12")
    drag(page, [(0.1, 0.5), (0.9, 0.5)])  # a band across the middle
    mask = painted_mask(page)
    assert mask.shape == (64, 64) and mask[32, 8] == mask[32, 56] == 255 and mask[2, 2] == mask[60, 32] == 0
    assert (mask[:, 32] >= 128).sum() in range(10, 15)  # 12 image pixels wide, whatever the display size
    page.check("#tool_eraser")
    drag(page, [(0.75, 0.3), (0.75, 0.7)])
    assert painted_mask(page)[32, 48] == 0 and painted_mask(page)[32, 16] == 255
    page.click("#clear_mask")
    assert painted_mask(page) is None
    page.check("#tool_brush")
    drag(page, [(0.1, 0.5), (0.6, 0.5)])

    body = run_and_capture(page)
    sent = np.asarray(Image.open(io.BytesIO(page_png(body["mask"]))).convert("L"))
    assert np.array_equal(sent, painted_mask(page)) and body["strength"] == 1
    figure = page.locator("figure.result").first
    shown = page_png(figure.locator("img.image").get_attribute("src"))
    assert figure.locator("img.original").get_attribute("src") == body["image"]  # beside the original
    made = json.loads(Image.open(io.BytesIO(shown)).text["mflux"])
    assert made["variant"] == "fill" and made["strength"] == 1.0
    assert same_image(shown, api_png(ui[0], body))


def test_edit_mode_on_a_kontext_model(page, ui, tmp_path):
    page.select_option("#model", "kontext")
    assert page.text_content("#image_legend").startswith("Edit by instruction (kontext)")
    fill_form(page, prompt="make it a snowy winter evening", seed="13")
    page.fill("#width", "")
    page.fill("#height", "")  # the reference's aspect
    assert page.is_hidden("#mask_tools") and page.is_hidden("#strength_label")
    reference = tmp_path / "reference.png"
    Image.new("RGB", (60, 40), (200, 120, 30)).save(reference)
    page.set_input_files("#init_image", str(reference))
    page.wait_for_function("!document.querySelector('#init_preview').hidden")
    assert page.is_hidden("#mask_canvas")

    body = run_and_capture(page)
    assert "mask" not in body and "strength" not in body and body["width"] is None
    figure = page.locator("figure.result").first
    shown = page_png(figure.locator("img.image").get_attribute("src"))
    assert figure.locator("img.original").get_attribute("src") == body["image"]
    made = Image.open(io.BytesIO(shown))
    assert made.size == (48, 32) and json.loads(made.text["mflux"])["variant"] == "kontext"
    assert same_image(shown, api_png(ui[0], body))
    # back to schnell and no image, for any test after this one
    page.select_option("#model", "schnell")
    page.set_input_files("#init_image", [])
    page.wait_for_function("document.querySelector('#init_preview').hidden")


def test_the_page_asks_for_the_key_once_and_keeps_it(ui, new_page):
    with serving(ServerSettings(model="schnell", api_key="se=kr;it +%")) as (url, _):  # the store has 3
        page = new_page()
        page.goto(url + "/")
        page.fill("#key", "wrong")
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert page.locator("#key").count() == 1 and page.locator("#model").count() == 0  # asked again
        page.fill("#key", "se=kr;it +%")
        with page.expect_navigation():
            page.click("button[type=submit]")
        page.wait_for_function(
            "document.querySelector('#model') && document.querySelector('#model').value === 'schnell'"
        )
        assert any(c["name"] == "mflux_api_key" for c in page.context.cookies())
        page.reload()  # the cookie carries the key from now on
        page.wait_for_function("document.querySelector('#model').value === 'schnell'")
