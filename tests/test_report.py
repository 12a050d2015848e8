"""snakemake --report: one HTML file with the QC figures, ion images, registration scores and the
accuracy table of a small phantom study, rendered by a headless Chromium."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_workflow import setup_study, snakemake

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")


def chromium_or_skip() -> Path:
    """Debian's chromium; absent: skip, except in CI (CI=true), where its absence is a failure."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing in CI (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")


def screenshot(html: Path, png: Path, profile: Path) -> None:
    """The report as a 1400 x 1000 PNG (the README's command, plus time for its scripts to run)."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
           f"--screenshot={png}", "--window-size=1400,1000", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png.exists() and png.stat().st_size > 0, (proc.returncode, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("report")
    summary, cfg = setup_study(workdir)
    snakemake(workdir)
    html = workdir / "report.html"
    snakemake(workdir, "--report", str(html))
    return workdir, html, summary, cfg


def test_report_lists_figures_tables_and_categories(report_html):
    workdir, html, summary, cfg = report_html
    assert html.stat().st_size > 100_000
    text = html.read_text(errors="replace")
    for category in ("Accuracy", "Registration", "Ion images", "Spectra", "NMF", "Grid removal"):
        assert category in text, category
    names = ["evaluation.tsv", "registration.tsv", "roi_mean_spectra.png",
             "tofsims.degrid_qc.png", "tofsims_components.degrid.png"]
    names += [f"{m}_components.png" for m in cfg["chain"]]
    names += [f"qc_{c}_{f}.png" for c, f in zip(cfg["chain"][:-1], cfg["chain"][1:])]
    names += [f"ion_{m}_mz{mz:.4f}.png" for m in cfg["chain"] for mz in cfg["targets"]["mz"]]
    missing = [n for n in names if n not in text]
    assert not missing, missing
    for section in summary["sections"]:
        assert section in text
    # the registration table has a row per section and pair, all passed
    rows = (workdir / "results" / "registration.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert header[:4] == ["section", "coarse", "fine", "passed"]
    assert len(rows) == 1 + len(summary["sections"]) * (len(cfg["chain"]) - 1)
    assert all(r.split("\t")[3] == "true" for r in rows[1:])
    assert (workdir / "logs" / "registration_summary.log").exists()


def test_report_renders_in_headless_chromium(report_html, tmp_path):
    from PIL import Image

    chromium_or_skip()
    _, html, _, _ = report_html
    png = tmp_path / "report.png"
    screenshot(html, png, tmp_path / "chromium-profile")
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (1000, 1400)
    grey = img.mean(axis=2)
    assert grey.std() > 10, grey.std()                      # not a blank page
    assert (np.abs(grey - np.median(grey)) > 30).mean() > 0.02   # text, menu and panels drawn
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 50   # more than a couple of colours
