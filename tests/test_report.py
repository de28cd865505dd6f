"""The report stage: one self-contained page from a tiny pipeline run's metrics, plots and sample grids,
opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from condenser.core.config import load_params
from condenser.core.errors import DataError
from condenser.core.io import StagePaths, read_json
from condenser.report import build_report, summary
from condenser.report.browser import BrowserMissing, open_in_browser
from tasks import report as report_task


@pytest.fixture
def project(validated_root: Path, tmp_path: Path) -> Path:
    """A copy of a finished tiny pipeline run (every stage up to validate, on the tiny params), which a test
    may damage."""
    root = tmp_path / "project"
    shutil.copytree(validated_root, root)
    return root


def _png_pixels_vary(path: Path) -> bool:
    """Whether a PNG has more than one colour (a blank screenshot is one)."""
    from PIL import Image

    with Image.open(path) as im:
        lo, hi = im.convert("L").getextrema()
    return hi - lo > 50


def test_report_shows_every_deliverable_and_target(project: Path, tmp_path: Path):
    params = load_params(project / "params.yaml")
    metrics = report_task.run(params, StagePaths(project))
    out = project / "data" / "report"
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    deliverables, targets = list(params.deliverables), list(params.targets)
    for name in deliverables:
        assert f'id="deliverable-{name}"' in html and f"### {name}" in md
    for name in targets:
        assert f'id="target-{name}"' in html and f"### {name}" in md
    # Self-contained: no fetch leaves the file; images are inline.
    assert not re.search(r"https?://", html)
    assert "data:image/png;base64," in html
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / rel).is_file(), rel
    assert sorted(p.name for p in out.glob("pareto_*.png")) == ["pareto_gan_editor.png", "pareto_sd_unet.png"]
    assert (out / "manifest.json").is_file()
    model = read_json(out / "report.json")
    assert [d["name"] for d in model["deliverables"]] == deliverables
    # The chain: sparse only where sparse.chain names a variant; int8 on every runtime quantize deployed.
    for d in model["deliverables"]:
        quantized = read_json(project / "metrics" / "quantize" / f"{d['name']}.json")["deployed"]
        sparse = [] if params.sparse.chain[d["name"]] == "dense" else ["sparse"]
        int8 = [f"int8:{rt}" for rt in params.quantize.runtimes if rt in quantized]
        assert [r["key"] for r in d["rows"]] == ["teacher", "distilled", *sparse, *int8]
    # A student image costs its UNet calls: the distilled step's latency ratio is the calls' ratio.
    student = next(d for d in model["deliverables"] if d["kind"] == "sd_unet")
    teacher, distilled = student["rows"][0], student["rows"][1]
    assert distilled["vs_prev"]["latency"] == pytest.approx(distilled["calls"] / teacher["calls"])
    assert "UNet calls" in student["latency_unit"]
    # The written metrics: counts as validate recorded them, and int8 on cpu smaller and faster than the teacher.
    validated = [read_json(f) for f in (project / "metrics" / "validate").glob("*.json")]
    assert metrics["counts"]["deliverables"] == len(deliverables) and metrics["counts"]["targets"] == len(targets)
    assert metrics["counts"]["failed"] == sum(v["summary"].get("failed", 0) for v in validated)
    for name, h in metrics["headline"].items():
        assert h["size_vs_teacher"] < 1 and h["latency_vs_teacher"] < 1, name
    assert json.loads((project / "metrics" / "report.json").read_text())["paths"]["html"] == "data/report/report.html"
    text = summary(project)
    assert all(name in text for name in deliverables + targets)

    try:
        shot = tmp_path / "shot.png"
        visible = open_in_browser(out / "report.html", shot)
    except BrowserMissing as err:
        pytest.skip(str(err))
    for name in deliverables + targets:
        assert name in visible, name
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])
    assert width >= 800 and height > 2000
    assert _png_pixels_vary(shot)


def test_failing_render_leaves_no_output(project: Path):
    """A grid that is not a PNG fails the render inside the stage's temporary folder: no data/report at all."""
    bad = project / "data" / "validate" / "cpu" / "samples" / "student.png"
    bad.write_bytes(b"not a png")
    params = load_params(project / "params.yaml")
    with pytest.raises(DataError, match="student.png"):
        build_report(project, params)
    assert not (project / "data" / "report").exists()
    assert not list((project / "data").glob(".report*"))
    assert not (project / "metrics" / "report.json").exists()
