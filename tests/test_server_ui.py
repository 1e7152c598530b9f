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
from PIL import Image, PngImagePlugin

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
def ui(mflux_home, tiny_schnell, tmp_path_factory):
    store_hf_folder(tiny_schnell, "schnell")
    loras = tmp_path_factory.mktemp("loras")
    write_lora(loras, tiny_schnell)
    gate = threading.Event()
    gate.set()
    settings = ServerSettings(model="schnell", lora_dir=loras)
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


def test_the_page_asks_for_the_key_once_and_keeps_it(ui, new_page):
    with serving(ServerSettings(api_key="se=kr;it +%")) as (url, _):
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
