"""The web page at ``/ui``: its files over HTTP (types, caching, no external URL, open with API keys on)
and a real headless Chromium run (pick a class, upload, run, overlay, opacity, heatmap, jobs panel)."""

from __future__ import annotations

import fnmatch
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from svclib import Model, Service, labels_of, running_service, service_env, start_server, upload_zip, wait_for

from hsc.service.routes.ui import ASSETS, PUBLIC_PATHS

UI_DIR = Path(__file__).resolve().parents[2] / "service" / "ui"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def svc(model: Model, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service("embedded", model, dataset, tmp_path_factory.mktemp("ui")) as s:
        yield s


def test_the_page_and_its_files(svc: Service) -> None:
    c = svc.client
    r = c.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert 'src="ui/main.js"' in html and 'href="ui/style.css"' in html and 'href="docs"' in html
    assert c.get("/ui", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    for path, where in (("/", "ui"), ("/ui/", "../ui")):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == where
    assert c.get("/", follow_redirects=True).url.path == "/ui"
    types = {"css": "text/css", "js": "text/javascript", "html": "text/html"}
    for name in ASSETS:
        r = c.get(f"/ui/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] == types[name.rsplit(".", 1)[1]], name
        assert r.content == (UI_DIR / name).read_bytes()
    r = c.get("/ui/nope.js")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert c.get("/ui/../pyproject.toml").status_code == 404
    assert c.head("/ui/main.js").status_code == 200
    assert "/ui" not in c.get("/openapi.json").json()["paths"]


def test_every_file_is_served_shipped_and_local() -> None:
    on_disk = {p.name for p in UI_DIR.iterdir() if p.is_file()}
    assert on_disk == set(ASSETS), "service/ui/ and ASSETS of service/routes/ui.py differ"
    for name in ASSETS:
        text = (UI_DIR / name).read_text()
        assert not re.search(r"https?://", text), f"{name} refers to another host"
        for ref in re.findall(r'from "\./([^"]+)"', text):  # every module import is a served file
            assert ref in ASSETS, (name, ref)
    if sys.version_info >= (3, 11):  # the package data of a non-editable install covers every file
        import tomllib

        conf = tomllib.loads((UI_DIR.parents[1] / "pyproject.toml").read_text())
        patterns = conf["tool"]["setuptools"]["package-data"]["hsc.service"]
        for name in ASSETS:
            assert any(fnmatch.fnmatch(f"ui/{name}", p) for p in patterns), name


def test_with_api_keys_the_page_loads_but_the_data_needs_a_key(
    model: Model, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("ui-keys")
    env = service_env("embedded", model, dataset, tmp / "results", "unused", HSC_API_KEYS="ui-key")
    proc, url = start_server(env, tmp, ready=False)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/ui").status_code == 200
            for name in ASSETS:
                assert c.get(f"/ui/{name}").status_code == 200, name
            for path in PUBLIC_PATHS:
                assert c.get(path, follow_redirects=False).status_code in (200, 307), path
            for method, path in [
                ("GET", "/models"),
                ("GET", "/jobs"),
                ("POST", "/ui"),
                ("DELETE", "/ui/main.js"),
                ("GET", "/ui/other.js"),
                ("GET", "/uix"),
                ("GET", "/ui/main.js/x"),
            ]:
                r = c.request(method, path)
                assert r.status_code == 401, (method, path, r.status_code)
            assert c.get("/jobs", headers={"X-API-Key": "ui-key"}).status_code == 200  # /models may wait
    finally:
        proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# in a browser


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no /usr/bin/chromium or /usr/bin/chromedriver: apt-get install chromium chromium-driver")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _errors(driver) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_in_a_browser(svc: Service, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    find = d.find_element
    d.get(svc.url + "/")
    chips = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#chips .chip"), 20, "the class chips")
    assert [c.text for c in chips] == list(svc.model.classes[1:])
    assert find(By.ID, "model").get_attribute("value") == svc.model.id
    find(By.ID, "auto").click()  # auto: the chips are off, the classifier threshold shows
    assert not chips[0].is_enabled() and find(By.ID, "label-threshold").is_displayed()
    find(By.ID, "auto").click()
    assert chips[0].is_enabled() and not find(By.ID, "label-threshold").is_displayed()
    wanted = labels_of(svc.dataset, 0)[0]
    find(By.CSS_SELECTOR, f'#chips .chip[data-name="{wanted}"]').click()
    find(By.ID, "crf").click()  # CRF off: faster
    image = svc.dataset / "JPEGImages" / "train_000000.jpg"
    find(By.ID, "image").send_keys(str(image))
    find(By.ID, "run").click()

    wait_for(lambda: find(By.ID, "result").is_displayed(), 60, "the result", interval=0.2)
    overlay = find(By.ID, "overlay")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert d.execute_script("return arguments[0].naturalWidth", overlay) == 64
    rows = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#legend tr"), 10, "the legend")
    assert [r.find_element(By.TAG_NAME, "th").text.strip() for r in rows] == [wanted]
    assert "%" in rows[0].text
    assert find(By.ID, "download-mask").get_attribute("href").startswith("data:image/png;base64,")
    assert "crf" in find(By.ID, "settings").text and "total" in find(By.ID, "timings").text

    before = overlay.value_of_css_property("opacity")
    slider = find(By.ID, "opacity")
    slider.send_keys(Keys.HOME)  # the keyboard moves it
    assert overlay.value_of_css_property("opacity") == "0" != before
    slider.send_keys(Keys.END)
    assert overlay.value_of_css_property("opacity") == "1"

    toggle = find(By.CSS_SELECTOR, "#legend button.toggle")
    toggle.click()
    heat = find(By.ID, "heat")
    assert toggle.get_attribute("aria-pressed") == "true" and heat.is_displayed() and toggle.text == "hide"
    assert heat.get_attribute("src").startswith("data:image/png;base64,") and not overlay.is_displayed()
    toggle.click()
    assert not heat.is_displayed() and overlay.is_displayed()

    # a job sent through the API shows up with its progress, then its downloads
    archive = upload_zip(svc.dataset, 4)
    r = svc.client.post("/jobs", files={"archive": ("data.zip", archive, "application/zip")})
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    find(By.ID, "jobs-refresh").click()
    in_row = f'#jobs li[data-id="{jid}"]'
    row = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, in_row), 10, "the job row")[0]
    assert row.find_element(By.TAG_NAME, "progress")
    svc.wait_job(jid)
    links = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, f"{in_row} .downloads a"), 10, "the downloads")
    assert [a.text for a in links] == ["voc", "coco", "labelstudio", "cvat-segmask", "raw"]
    assert links[0].get_attribute("href") == f"{svc.url}/jobs/{jid}/archive?format=voc"
    d.execute_script("const s = arguments[0]; s.value = 45; s.dispatchEvent(new Event('input'))", slider)
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot("/tmp/ui.png")  # to look at
    assert _errors(d) == []

    # narrow screens: no sideways scrolling
    d.set_window_size(390, 900)
    d.save_screenshot("/tmp/ui-narrow.png")
    wide = d.execute_script(
        "return [...document.querySelectorAll('body *')].filter(e => e.getClientRects().length"
        " && e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)"
        ".map(e => `${e.tagName}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`)"
    )
    assert wide == [], "wider than a phone's screen"
    d.set_window_size(1280, 1600)

    # a server error shows the problem's detail
    bad = svc.results_dir.parent / f"not-an-image-{secrets.token_hex(2)}.png"
    bad.write_bytes(b"hello")
    find(By.ID, "image").send_keys(str(bad))
    find(By.ID, "run").click()
    error = find(By.ID, "run-error")
    wait_for(lambda: error.is_displayed() and error.text, 20, "the error")
    assert "unsupported_media" in error.text or "corrupt_image" in error.text, error.text
