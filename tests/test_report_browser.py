"""The report in a real browser: headless Chromium loads report.html from disk.

Checked from the DOM Chromium builds (``--dump-dom``), from its screenshot (the heat-map colours, the
status badges and the very pictures of the montage are on screen) and from its network log
(``--log-net-log``): no request leaves the page. The network check is shown to catch a page that does
reach out. Without Chromium the tests skip; CI (.ci/run) installs it and sets CELLBATCH_REQUIRE_CHROMIUM
so that there they fail instead.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellbatch.check.confusion import heat_colours, row_fractions
from cellbatch.report import build_report
from cellbatch.report.figures import STATUS_COLOURS
from tests.test_report import Page, decode

WIDTH, HEIGHT = 1300, 5000
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CELLBATCH_REQUIRE_CHROMIUM"):
        pytest.fail("CELLBATCH_REQUIRE_CHROMIUM is set but no chromium is installed (apt-get install chromium)")
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")


def headless(chromium: str, page: Path, work: Path, *mode: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on ``page``, in its own profile, with Chromium's own traffic turned off."""
    args = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", f"--user-data-dir={work / 'profile'}", "--force-device-scale-factor=1",
            "--force-color-profile=srgb", f"--window-size={WIDTH},{HEIGHT}", *mode, page.as_uri()]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses its sandbox as root (CI containers)
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def page_requests(net_log: Path) -> list[str]:
    """URLs the page itself asked for: requests started in the file:// page's network partition."""
    text = net_log.read_text(encoding="utf-8").rstrip()
    if not text.endswith("}"):  # a log cut short ends inside the event list
        text = text.rstrip(",") + "]}"
    data = json.loads(text)
    start_job = data["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in data.get("events", []):
        params = event.get("params") or {}
        if event.get("type") == start_job and "file://" in str(params.get("network_isolation_key", "")):
            urls.append(str(params.get("url")))
    return [u for u in urls if not u.startswith(("file:", "data:"))]


@pytest.fixture(scope="module")
def rendered(chromium, report_run, tmp_path_factory):
    """A short report of the report run (two cells per class), its DOM, screenshot and network log."""
    work = tmp_path_factory.mktemp("browser")
    page = build_report(report_run.out, work / "report.html", cells_per_class=2).path
    dom = headless(chromium, page, work, "--dump-dom").stdout
    headless(chromium, page, work, f"--screenshot={work / 'shot.png'}", f"--log-net-log={work / 'net.json'}",
             "--net-log-capture-mode=Default")
    shot = cv2.imread(str(work / "shot.png"))[..., ::-1]
    return {"page": page, "dom": Page(dom), "shot": shot, "net_log": work / "net.json", "work": work}


def colour_pixels(shot: np.ndarray, rgb) -> int:
    return int(np.all(shot == np.asarray(rgb, np.uint8), axis=2).sum())


def test_the_dom_holds_the_slide_table_montages_and_heat_maps(rendered, report_run):
    dom = rendered["dom"]
    run = json.loads((report_run.out / "run.json").read_text())
    rows = [tr for tr in dom.inside("slide-table", "tr") if tr["attrs"].get("id")]
    assert len(rows) == len(run["slides"]) == 3
    tiles = [img for img in dom.find("img") if img["attrs"].get("alt") in ("crop", "generated", "normalised",
                                                                           "reference")]
    assert len(tiles) >= 8 and all(len(t["attrs"]["src"]) > 2000 for t in tiles)
    heat = [td for td in dom.inside("heat-run", "td") if td["attrs"].get("class") == "c"]
    assert len(heat) == 9 and sum(int(td["text"]) for td in heat) > 0


def test_the_screenshot_shows_heat_map_colours_status_badges_and_the_montage_pictures(rendered):
    dom, shot = rendered["dom"], rendered["shot"]
    assert shot.shape[1] == WIDTH and len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000  # not blank

    counts = np.array([int(td["text"]) for td in dom.inside("heat-run", "td") if td["attrs"].get("class") == "c"])
    matrix = counts.reshape(3, 3)
    for colour in {tuple(int(v) for v in c) for c in heat_colours(row_fractions(matrix)).reshape(-1, 3)}:
        assert colour_pixels(shot, colour) >= 1000, f"heat-map colour {colour} is not on screen"

    for status in ("qc_failed", "failed"):
        rgb = tuple(int(STATUS_COLOURS[status][i : i + 2], 16) for i in (1, 3, 5))
        assert colour_pixels(shot, rgb) >= 200, f"no {status} badge on screen"

    # In colour: the generated picture differs from the crop by its colours (red and blue swapped).
    tiles = [img for img in dom.find("img") if img["attrs"].get("alt") in ("crop", "generated", "normalised",
                                                                           "reference")]
    for tile in tiles[:4]:
        picture = cv2.resize(decode(tile["attrs"]["src"]), (192, 192), interpolation=cv2.INTER_AREA)
        score = cv2.matchTemplate(np.ascontiguousarray(shot), picture, cv2.TM_CCOEFF_NORMED).max()
        assert score > 0.9, f"the {tile['attrs']['alt']} picture is not on screen (best match {score:.2f})"


def test_the_page_made_no_network_request(rendered):
    assert page_requests(rendered["net_log"]) == []


def test_the_network_check_catches_a_page_that_reaches_out_and_the_csp_blocks_it(chromium, tmp_path, rendered):
    from cellbatch.report.page import CSP

    external = '<img src="http://192.0.2.7/cell.png"><link rel="stylesheet" href="https://fonts.example.invalid/a.css">'
    pixel = base64.b64encode(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()).decode()
    for name, head in (("open", ""), ("guarded", f'<meta http-equiv="Content-Security-Policy" content="{CSP}">')):
        page = tmp_path / f"{name}.html"
        page.write_text(f"<!DOCTYPE html><html><head>{head}</head><body>{external}"
                        f'<img src="data:image/png;base64,{pixel}"></body></html>')
        headless(chromium, page, tmp_path, "--screenshot=" + str(tmp_path / f"{name}.png"),
                 f"--log-net-log={tmp_path / name}.json", "--net-log-capture-mode=Default")
        requests = page_requests(tmp_path / f"{name}.json")
        if name == "open":
            assert set(requests) >= {"http://192.0.2.7/cell.png", "https://fonts.example.invalid/a.css"}
        else:
            assert requests == []
