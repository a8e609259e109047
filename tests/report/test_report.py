"""Reports render in a real headless browser (Debian chromium through Playwright) without console errors,
with every figure drawn; the page needs no network (plotly.js is inlined)."""

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from deepsqueeze.cli.app import main
from deepsqueeze.report import layer_bytes
from deepsqueeze.search import load_space, run_search

SPACE = {
    "model": "zoo:lenet300@digits",
    "data": "digits",
    "objectives": ["quality", "bytes", "latency"],
    "latency": {"batch": 32, "threads": 1},
    "stages": [
        {"type": "prune", "optional": True, "storage": "dense", "sparsity": {"choice": [0.5, 0.8]}},
        {"type": "quantize", "method": "rtn", "bits": {"per_layer": {"choice": [2, 4, 8]}}},
    ],
}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, lenet300_digits):
    folder = tmp_path_factory.mktemp("report")
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    space, model = load_space(folder / "space.yaml")
    run_search(space, model, folder / "out", sampler="random", trials=3)
    return folder / "out"


def write_report(source: Path, out: Path) -> None:
    try:
        main(["report", str(source), "--out", str(out)])
    except SystemExit as exc:
        assert exc.code in (0, None)


def open_in_chromium(page_path: Path, screenshot: Path) -> tuple[list[str], int, str]:
    """(console errors, number of drawn plotly figures, page text) of ``page_path`` in headless chromium."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        if os.environ.get("DEEPSQUEEZE_REQUIRE_DATA") == "1":
            pytest.fail("chromium is missing but DEEPSQUEEZE_REQUIRE_DATA=1 (CI): apt-get install chromium")
        pytest.skip("chromium (Debian package chromium) is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # no network: any request leaving the file would fail the page
            page.route(re.compile(r"^https?://"), lambda route: (errors.append(f"network: {route.request.url}"),
                                                                  route.abort()))
            page.goto(page_path.resolve().as_uri())
            page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length > 0")
            drawn = page.evaluate("Array.from(document.querySelectorAll('.plotly-graph-div'))"
                                  ".filter(d => d.querySelector('.main-svg') && d.querySelectorAll('g.trace').length > 0).length")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return errors, drawn, text


def test_study_report_renders_in_chromium(study_dir, tmp_path):
    out = tmp_path / "study.html"
    write_report(study_dir, out)
    html = out.read_text()
    assert "<script src=" not in html  # plotly.js is inline, nothing is fetched
    errors, drawn, text = open_in_chromium(out, tmp_path / "study.png")
    assert errors == []
    # two Pareto views (bytes, latency), hypervolume, parameter importance
    assert drawn == 4, text
    assert "Pareto front" in text and "Hypervolume per trial" in text and "Parameter importance" in text
    assert (tmp_path / "study.png").stat().st_size > 10_000


def test_artifact_report_renders_in_chromium(study_dir, tmp_path):
    artifact = sorted((study_dir / "trials").glob("*.dsq"))[0]
    out = tmp_path / "artifact.html"
    write_report(artifact, out)
    errors, drawn, text = open_in_chromium(out, tmp_path / "artifact.png")
    assert errors == [] and drawn == 2, text
    assert "Bytes per layer" in text and "Output error per layer" in text and "Stages" in text


def test_layer_bytes_add_up_to_the_payload(study_dir):
    from deepsqueeze.codec.format import read_manifest

    artifact = sorted((study_dir / "trials").glob("*.dsq"))[0]
    manifest, payload, _ = read_manifest(artifact)
    per_layer = layer_bytes(manifest)
    assert sum(r["bytes"] for r in per_layer.values()) == sum(
        length for e in manifest["tensors"] for _, length, _ in e["segments"])
    assert set(per_layer) == {"1", "3", "5"}
