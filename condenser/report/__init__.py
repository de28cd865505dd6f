"""The one-page report: every deliverable's compression chain, every target's gates, Pareto plots, the sample
grids and the lineage, read from a finished pipeline run (issue 11, "report").

    path = build_report(root, params)   # data/report/{report.html, report.md, report.json, *.png, manifest.json}
    print(summary(root))                # a few lines for the terminal

`collect` turns the project's metrics, plots, params.yaml and dvc.lock into a plain model; `render` writes it;
`browser.open_in_browser` opens the page in headless Chromium.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from condenser.core.errors import DataError
from condenser.core.io import StagePaths, read_json
from condenser.report.collect import collect, settings
from condenser.report.render import fmt_ratio, render

__all__ = ["build", "build_report", "collect", "render", "summary"]
STAGE = "report"


def inputs(root: Path, model: dict) -> list[Path]:
    """What the page is made from (its manifest records their md5): every metrics file but the report's own,
    the grids shown, dvc.lock and params.yaml."""
    root = Path(root)
    own = root / "metrics" / f"{STAGE}.json"
    grids = model["grids"]["general"] + [i for v in model["grids"]["deliverables"].values() for i in v]
    found = [*sorted((root / "metrics").rglob("*.json")), *(root / i["path"] for i in grids), root / "dvc.lock",
             root / "params.yaml"]
    return [p for p in dict.fromkeys(found) if p.exists() and p != own]


def build(root: Path, params: Any) -> dict:
    """Run the report stage on a project root: data/report/ written atomically with its manifest, and
    metrics/report.json (counts, files written, headline ratios per deliverable). Returns those metrics."""
    from condenser.core.stage import Stage

    root = Path(root)
    paths = StagePaths(root)
    title, target = settings(params)
    stage = Stage(STAGE, paths, {"title": title, "target": target})
    model = collect(root, params)
    for p in inputs(root, model):
        stage.add_input(p)
    out = stage.output_dir.relative_to(root).as_posix()
    with stage.output(artifact=f"one-page report of {model['counts']['deliverables']} deliverables and "
                               f"{model['counts']['targets']} targets (HTML, Markdown, PNG, JSON)") as tmp:
        written = render(model, root, tmp)
    files = {k: (f"{out}/{v}" if isinstance(v, str) else [f"{out}/{x}" for x in v]) for k, v in written.items()}
    headline = {d["name"]: d["headline"] for d in model["deliverables"] if d["headline"]}
    return stage.finish({"counts": model["counts"], "target": target, "paths": files, "headline": headline})


def build_report(root: Path, params: Any) -> Path:
    """Build the report (see `build`) and return the path of report.html."""
    build(root, params)
    return StagePaths(Path(root)).data(STAGE) / "report.html"


def summary(root: Path) -> str:
    """A few lines for the terminal from the built report: per deliverable the int8 model's latency and size
    against the teacher and dense, per target its pass / fail counts."""
    path = StagePaths(Path(root)).data(STAGE) / "report.json"
    if not path.is_file():
        raise DataError(f"{path}: no report yet; build it first (`dvc repro report`)")
    model = read_json(path)
    lines = [f"{model['title']}: {path.with_name('report.html')}"]
    for d in model["deliverables"]:
        h = d["headline"]
        if not h:
            lines.append(f"  {d['name']}: no int8 model on target {model['target']}")
            continue
        lines.append(f"  {d['name']} int8 on {h['runtime']}: latency {fmt_ratio(h['latency_vs_teacher'])} teacher, "
                     f"{fmt_ratio(h['latency_vs_dense'])} dense; size {fmt_ratio(h['size_vs_teacher'])} teacher, "
                     f"{fmt_ratio(h['size_vs_dense'])} dense")
    for t in model["targets"]:
        c = t.get("counts") or {}
        detail = (f"{c.get('pass', 0)} pass, {c.get('fail', 0)} fail, {c.get('skipped', 0)} skipped" if c
                  else t.get("skipped") or "")
        lines.append(f"  target {t['name']}: {t.get('status')} ({detail})")
    return "\n".join(lines)
