"""The report: self-contained HTML (charts as base64 PNG) and its markdown twin, rendered in
headless Chromium (Debian's chromium + chromium-driver, installed by .ci/install_browser.sh)."""

import base64
import os
import re
import shutil
import tempfile

import pytest

import graphprune as gp
from graphprune.ir.errors import ArtifactError
from graphprune.app.report import render, write_report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "art"
    gp.run({"model": "resnet_tiny", "prune": {"ratio": 0.3, "scope": "global"},
            "sparsify": {"pattern": "unstructured", "sparsity": 0.4}, "out": str(out)})  # fmt: skip
    return out


def test_html_is_self_contained_with_charts(artifact):
    page = (artifact / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external resource
    assert "<script" not in page
    pngs = re.findall(r'<img class="chart" alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [a for a, _ in pngs] == ["Parameters per layer", "MACs per layer",
                                    "Sparsity per layer"]  # fmt: skip
    for _, b64 in pngs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Verify (atol 0.0001, rtol 0.0001: passed)" in page
    assert "Kernels chosen" in page and "Contraction" in page


def test_markdown_twin_has_the_same_tables(artifact):
    md = (artifact / "report.md").read_text()
    for heading in ("## Totals", "## Verify", "## Layers", "## Kernels chosen"):
        assert heading in md
    assert "| stages.1.0.body.0.weight | 16×8×3×3 |" in md
    assert "0.4" in md  # per-layer sparsity


def test_report_into_another_folder_and_errors(artifact, tmp_path):
    html, md = write_report(artifact, tmp_path / "r")
    assert html.read_text().count('<img class="chart"') == 3
    tail = lambda text: text[text.index("## Verify"):]
    assert tail(md.read_text()) == tail((artifact / "report.md").read_text())
    with pytest.raises(ArtifactError, match="not found"):
        render(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="has no summary.json"):
        render(tmp_path / "plain")


def _driver(user_dir):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={user_dir}",
                 "--window-size=1200,2000"):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_renders_in_headless_chromium(artifact, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium / chromedriver missing: run .ci/install_browser.sh")
        pytest.skip("chromium / chromedriver missing: run .ci/install_browser.sh")
    user_dir = tempfile.mkdtemp(prefix="gp-chromium-")
    driver = _driver(user_dir)
    try:
        driver.get((artifact / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.querySelectorAll('img.chart')).map("
            "i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")  # fmt: skip
        assert len(images) == 3
        assert all(done and w > 200 and h > 100 for _, done, w, h in images), images
        assert driver.find_element("tag name", "h1").text.startswith("graphprune report")
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
    finally:
        driver.quit()
        shutil.rmtree(user_dir, ignore_errors=True)
