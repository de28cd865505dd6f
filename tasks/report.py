"""report — one page a person reads instead of the logs (condenser.report).

Per deliverable the chain teacher -> distilled -> sparse -> int8 per runtime with quality, size, latency and
their ratios; per target its pass / fail table; Pareto plots per deliverable kind; the sample grids; the
lineage (commit, params, md5 of every artifact in dvc.lock).

Outputs: data/report/{report.html (self-contained), report.md, report.json, pareto_<kind>.png, grids/*.png,
manifest.json}; metrics/report.json (counts, files written, per deliverable int8 latency and size against the
teacher and against dense on `report.target`).
"""

from __future__ import annotations

from condenser.core.config import Params
from condenser.core.io import StagePaths
from condenser.core.stage import stage_main
from condenser.report import build


def run(params: Params, paths: StagePaths) -> dict:
    return build(paths.root, params)


if __name__ == "__main__":
    stage_main("report", run, whole=True)
