"""The web page of `ldmkit serve` in a real headless browser: sign in with a key, generate, see the gallery."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from ldmkit.serve.auth import Keys
from ldmkit.serve.store import open_store
from tests.serve_helpers import ROOT, LiveServer

CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by the Makefile

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="the web page test drives Debian's chromium at /usr/bin/chromium; install it with `make` (apt chromium)",
)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    db = tmp_path_factory.mktemp("web") / "ldmkit.db"
    server = LiveServer(db, models=("emoji", "fashion-mnist-inpaint"))  # the second serves img2img only
    server.key = Keys(open_store(str(db))).create("web", "user")[0]
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the web page test needs playwright")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def sign_in(page, live, key: str) -> None:
    page.goto(live.url + "/")
    page.fill("#key", key)
    page.click("#login")


def test_a_user_signs_in_generates_and_sees_the_image_with_its_parameters(live, page):
    sign_in(page, live, live.key)
    page.wait_for_selector("#model option[value='emoji']", state="attached")
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"
    assert page.get_attribute("#width", "step") == str(live.service.models["emoji"].describe()["multiple"])
    assert "takes prompts" in page.inner_text("#model-info")
    assert page.evaluate("sessionStorage.getItem('ldmkit.key')") == live.key
    assert page.evaluate("localStorage.length") == 0 and live.key not in page.url

    # a value the server refuses: its own message is shown, naming the field
    page.fill("#steps", "100000")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "steps 100000 is out of range" in page.inner_text("#status")
    assert page.get_attribute("#steps", "aria-invalid") == "true"

    page.fill("#prompt", "red apple")
    page.fill("#negative", "blurry, <watermark>")  # the server's strings are shown as text, never parsed as HTML
    page.fill("#steps", "4")
    page.fill("#n", "2")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector("#status.done")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img.result')].every(i => i.complete && i.naturalWidth > 0)"
        " && document.querySelectorAll('#gallery img.result').length === 2"
    )
    images = page.eval_on_selector_all(
        "#gallery img.result", "els => els.map(i => [i.src, i.naturalWidth, i.naturalHeight])"
    )
    for src, width, height in images:
        assert src.startswith("data:image/png;base64,") and (width, height) == (64, 64)
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.size == (64, 64)
    shown = page.eval_on_selector_all(
        "#gallery figcaption dl",
        "dls => dls.map(dl => Object.fromEntries([...dl.querySelectorAll('dt')].map(t => "
        "[t.textContent, t.nextElementSibling.textContent])))",
    )
    assert [(s["prompt"], s["model"], s["seed"], s["steps"], s["cfg"], s["sampler"]) for s in shown] == [
        ("red apple", "emoji", "7", "4", "5", "dpmpp_2m"),
        ("red apple", "emoji", "8", "4", "5", "dpmpp_2m"),  # image i uses seed + i
    ]
    assert shown[0]["negative"] == "blurry, <watermark>" and page.locator("#gallery watermark").count() == 0
    assert page.evaluate("getComputedStyle(document.querySelector('img.result')).imageRendering") == "pixelated"

    if os.environ.get("LDMKIT_SCREENSHOT"):
        page.screenshot(path=str(ROOT / "docs" / "serve.png"), full_page=True)

    # signing out forgets the key; a reload shows the sign-in form again
    page.click("#signout")
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    assert page.is_visible("#key") and not page.is_visible("#gallery")


def test_under_its_security_policy_the_page_works_and_no_prompt_or_inline_script_runs(live, page):
    violations = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    sign_in(page, live, live.key)
    page.wait_for_selector("#model option[value='emoji']", state="attached")
    offered = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert offered == ["emoji"]  # the inpainting model cannot generate, so it is not offered
    assert page.evaluate("getComputedStyle(document.querySelector('#status')).minHeight") != "auto"  # styled

    attack = '<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>'
    page.fill("#prompt", attack)
    page.fill("#negative", attack)
    page.fill("#steps", "2")
    page.fill("#n", "1")
    page.click("#generate")
    page.wait_for_selector("#status.done")
    page.wait_for_selector("#gallery img.result")
    assert page.inner_text("#gallery dd") == attack  # shown as text
    assert page.evaluate("window.__xss") is None
    assert page.locator("#gallery script, #gallery img:not(.result)").count() == 0

    # the policy itself: an inline script, however it got into the page, is not run
    ran = page.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.__inline = 1';"
        " document.body.append(s); return window.__inline }"
    )
    assert ran is None
    assert violations and all("inline" in v or "script-src" in v for v in violations), violations


def test_a_wrong_key_shows_the_servers_error_and_no_gallery(live, page):
    sign_in(page, live, "ldk_0123456789ab_" + "A" * 43)  # well formed, unknown
    page.wait_for_selector("#status.error")
    assert "401" in page.inner_text("#status") and "not valid on this server" in page.inner_text("#status")
    assert page.is_visible("#key") and not page.is_visible("#gallery")
    assert page.locator("#gallery img.result").count() == 0
    assert page.evaluate("sessionStorage.length") == 0
