"""The Condenser pipeline as a Prefect flow, built from DVC's stage graph.

The DAG is written once, in `dvc.yaml`; this flow reads it from `Repo(root).index.graph` and makes one
Prefect task per DVC stage, named like the stage, that runs `dvc repro -s <stage>`. DVC decides whether
the stage runs (it is the cache, so Prefect caching and result persistence stay off), and the flow asks
DVC (`dvc status`) whether it will, rather than reading its log; Prefect adds the schedule, retries,
logs and lineage in the UI. After a stage runs, its outputs are published as asset
materializations (metadata: md5 from `dvc.lock`, params, metrics, git revision) and as lineage and
metrics artifacts (docs/architecture.md, "Lineage").

    python -m flows.pipeline [STAGE ...] [--force]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import chdir
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.states import Completed

from condenser.core.environment import git_revision
from condenser.lineage import flatten, format_value, read_metrics, stage_record

EXPECTATIONS_FILE = "expectations.json"
# validate's pass/fail table and the report's page, published as they are written.
TABLE_FILE = "table.md"
REPORT_FILES = ("report.md", "report.html")
# How much of a failed stage's output goes into the error that fails the flow.
ERROR_TAIL_LINES = 40


class StageFailed(RuntimeError):
    """`dvc repro -s <stage>` exited non-zero; the message holds the end of its output."""


@dataclass(frozen=True)
class StageSpec:
    """What the flow needs of one DVC stage, read from DVC's graph (paths relative to the root)."""

    name: str
    upstream: tuple[str, ...]
    outs: tuple[str, ...]
    artifacts: tuple[str, ...]
    metrics: tuple[str, ...]
    # Deps some stage produced (or a `.dvc` file tracks): the lineage. The rest (code, a user's folder
    # outside DVC) is covered by the commit and the md5s in dvc.lock.
    data_deps: tuple[str, ...]


def stage_graph(root: Path, targets: list[str] | None = None) -> list[StageSpec]:
    """The stages to run, upstream first: all of them, or `targets` and everything they depend on."""
    import networkx as nx
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(root).absolute()
    # Repo resolves dvc.yaml against the working directory, not its argument.
    with chdir(root), Repo(str(root)) as repo:
        graph = repo.index.graph
        # Stages without a command are `.dvc` files: raw inputs, nothing to run.
        stages = {s.addressing: s for s in graph.nodes if getattr(s, "cmd", None)}
        selected = set(stages)
        if targets:
            unknown = sorted(set(targets) - selected)
            if unknown:
                raise ValueError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has "
                                 f"{', '.join(sorted(stages))}")
            selected = set(targets)
            for name in targets:
                selected |= {up.addressing for up in nx.descendants(graph, stages[name])} & set(stages)
        # Edges point from a stage to its upstream: reversed topological order runs upstream first.
        order = [s.addressing for s in reversed(list(nx.topological_sort(graph))) if s.addressing in selected]
        # Every output in the project, `.dvc`-tracked raw data included: a dep is data by what made it.
        produced = {o.def_path for s in graph.nodes for o in s.outs}
        specs = []
        for name in order:
            stage = stages[name]
            upstream = list(graph.successors(stage))
            specs.append(StageSpec(
                name=name,
                upstream=tuple(sorted(up.addressing for up in upstream if up.addressing in selected)),
                outs=tuple(o.def_path for o in stage.outs),
                artifacts=tuple(o.def_path for o in stage.outs if not (o.metric or o.plot)),
                metrics=tuple(o.def_path for o in stage.outs if o.metric),
                data_deps=tuple(d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)
                                and _inside_any(d.def_path, produced)),
            ))
    return specs


def _inside_any(path: str, outs: set[str]) -> bool:
    return any(path == out or path.startswith(out.rstrip("/") + "/") for out in outs)


def asset_key(root: Path, rel: str) -> str:
    """A URI (scheme, no spaces) naming one output of this checkout."""
    return (Path(root).absolute() / rel).as_uri()


def _asset(root: Path, rel: str) -> Asset:
    # Equal objects for the same path, so a dep that is also inherited from the upstream task is one asset.
    return Asset(key=asset_key(root, rel), properties=AssetProperties(name=rel))


def _dvc_env() -> dict[str, str]:
    # The stage's `python -m tasks.X` must resolve to this interpreter's venv.
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


def stale_stages(root: Path, stages: list[str]) -> dict[str, list]:
    """The stages DVC finds out of date (`dvc status --json`), each with what changed."""
    cmd = [sys.executable, "-m", "dvc", "status", "--json", *stages]
    done = subprocess.run(cmd, cwd=root, env=_dvc_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise StageFailed(f"`dvc status` exited {done.returncode}\n{done.stderr[-2000:]}")
    lines = done.stdout.strip().splitlines()
    # DVC may print warnings before the JSON document, which is its last line.
    return json.loads(lines[-1]) if lines else {}


class Executions:
    """Whether each stage executes, as DVC says: out of date (or forced) when its turn comes.

    DVC is asked once for every stage when the flow starts. A stage that was up to date then stays so
    unless one of its upstream stages executed in this run (its outputs may have changed), and only then
    is DVC asked again, just before the stage's turn. A no-op run costs one `dvc status`.
    """

    def __init__(self, root: Path, specs: list[StageSpec], force: bool):
        self.root, self.force = root, force
        self.stale = set() if force else set(stale_stages(root, [s.name for s in specs]))
        self.executed: set[str] = set()
        self.lock = threading.Lock()

    def will_execute(self, spec: StageSpec) -> bool:
        with self.lock:
            upstream_ran = bool(self.executed & set(spec.upstream))
        if self.force or spec.name in self.stale:
            return True
        return upstream_ran and spec.name in stale_stages(self.root, [spec.name])

    def record(self, spec: StageSpec) -> None:
        with self.lock:
            self.executed.add(spec.name)


def dvc_repro(root: Path, stage: str, force: bool, log) -> None:
    """Run `dvc repro -s stage`, forwarding each output line to `log`."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    with subprocess.Popen(cmd, cwd=root, env=_dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            log(line)
            tail.append(line)
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage} failed: `{' '.join(cmd[1:])}` exited {proc.returncode}\n"
                          + "\n".join(tail))


def stage_report(root: Path, spec: StageSpec, executed: bool, wall_time_s: float) -> dict:
    """Plain data about one stage after its run: what it made, from what, and how well."""
    record = stage_record(root, spec.name)
    return {
        "stage": spec.name,
        "status": "executed" if executed else "skipped",
        "outputs": {p: record.outs.get(p, "") for p in spec.outs},
        "inputs": record.deps,
        "params": {k: v for values in record.params.values() for k, v in flatten(values).items()},
        "metrics": read_metrics(root, record),
        "git_revision": record.git_revision or git_revision(root),
        "wall_time_s": round(wall_time_s, 3),
    }


def publish_artifacts(root: Path, spec: StageSpec, report: dict) -> None:
    """Lineage, metrics and data-validation artifacts, which every Prefect UI shows."""
    key = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower())
    note = "ran in this flow run" if report["status"] == "executed" else "up to date; DVC did not rerun it"
    inputs = "; ".join(f"{p} {md5}" for p, md5 in report["inputs"].items())
    params = json.dumps(report["params"], sort_keys=True)
    create_table_artifact(
        key=f"{key}-lineage",
        table=[{"artifact": p, "md5": md5, "inputs": inputs, "params": params,
                "commit": report["git_revision"]} for p, md5 in report["outputs"].items()],
        description=f"Lineage of stage `{spec.name}` ({note}), from dvc.lock",
    )
    if report["metrics"]:
        create_table_artifact(
            key=f"{key}-metrics",
            table=[{"metric": k, "value": v} for k, v in report["metrics"].items()],
            description=f"Metrics of stage `{spec.name}` ({', '.join(spec.metrics)})",
        )
    for out in spec.outs:
        folder = Path(root) / out
        if (folder / TABLE_FILE).is_file():
            create_markdown_artifact(key=f"{key}-table", markdown=(folder / TABLE_FILE).read_text(),
                                     description=f"`{spec.name}`: pass/fail per deliverable and level")
        if all((folder / f).is_file() for f in REPORT_FILES):
            publish_report(folder, key)
        expectations = Path(root) / out / EXPECTATIONS_FILE
        if expectations.is_file():
            create_markdown_artifact(
                key=f"{key}-expectations",
                markdown=expectations_markdown(f"{out}/{EXPECTATIONS_FILE}", expectations),
                description=f"Great Expectations validation of `{out}`",
            )


def publish_report(folder: Path, key: str) -> None:
    """The one-page report: its Markdown in the UI, a link to the self-contained HTML, and its plots."""
    md, html = (folder / f for f in REPORT_FILES)
    # Images in the Markdown are relative links the UI cannot follow: the plots go as image artifacts.
    create_markdown_artifact(key=f"{key}-page", markdown=md.read_text(),
                             description=f"The pipeline on one page ({html})")
    create_link_artifact(key=f"{key}-html", link=html.absolute().as_uri(), link_text="report.html",
                         description="The self-contained report (open in a browser on this machine)")
    for png in sorted(folder.glob("pareto*.png")):
        slug = re.sub(r"[^a-z0-9-]+", "-", png.stem.lower())
        create_image_artifact(image_url=png.absolute().as_uri(), key=f"{key}-{slug}",
                              description=f"{png.name} (quality against latency and size)")


def expectations_markdown(title: str, path: Path) -> str:
    result = json.loads(path.read_text())
    lines = [f"# {title}", "",
             f"{result.get('evaluated', '?')} evaluated, {result.get('failed', '?')} failed", "",
             "| | expectation | column | unexpected | observed |", "|---|---|---|---|---|"]
    for r in result.get("results", []):
        lines.append(f"| {'pass' if r.get('success') else '**FAIL**'} | {r.get('expectation')} "
                     f"| {r.get('kwargs', {}).get('column', '')} | {r.get('unexpected_count', '')} "
                     f"| {'' if r.get('observed_value') is None else r['observed_value']} |")
    return "\n".join(lines)


def make_stage_task(root: Path, spec: StageSpec, force: bool, slots: threading.BoundedSemaphore,
                    executions: Executions):
    """The Prefect task for one stage; a materializing task when the stage has artifact outputs.

    Metrics and plots are not assets: they go into the metadata and artifacts, and as assets Prefect
    would pass them on as upstream of every downstream stage.
    """
    assets = [_asset(root, p) for p in spec.artifacts]

    def run_stage() -> Any:
        logger = get_run_logger()
        with slots:
            # Timed from here: the wait for a slot is not the stage's cost.
            started = time.perf_counter()
            executed = executions.will_execute(spec)
            dvc_repro(root, spec.name, force, logger.info)
        if executed:
            executions.record(spec)
        report = stage_report(root, spec, executed, time.perf_counter() - started)
        if executed:
            for asset in assets:
                add_asset_metadata(asset, {"md5": report["outputs"][asset.properties.name],
                                           "params": report["params"], "metrics": report["metrics"],
                                           "git_revision": report["git_revision"], "stage": spec.name})
        publish_artifacts(root, spec, report)
        if executed:
            return report
        # Prefect emits no asset event for a Cached task: an up-to-date stage materialized nothing.
        return Completed(name="Cached", message="DVC: stage up to date, not rerun", data=report)

    options = dict(name=spec.name, cache_policy=NO_CACHE, persist_result=False)
    if not assets:
        return task(run_stage, **options)
    return materialize(*assets, asset_deps=[_asset(root, d) for d in spec.data_deps], by="dvc",
                       **options)(run_stage)


@flow(name="condenser-pipeline", log_prints=True, persist_result=False)
def condenser_pipeline(root: str = ".", targets: list[str] | None = None, force: bool = False,
                       max_parallel: int = 1) -> dict:
    """Run the DVC stages (all, or `targets` and their upstream) as Prefect tasks, upstream first.

    Sibling stages may run side by side, at most `max_parallel` at once. The default is one: on a
    single machine, parallel stages share its cores and each trains with all of them, so running
    several at once is slower than running them in turn. Raise it when stages get their own GPUs.
    """
    started = time.perf_counter()
    root_path = Path(root).absolute()
    specs = stage_graph(root_path, targets)
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
    slots = threading.BoundedSemaphore(max_parallel)
    executions = Executions(root_path, specs, force)

    futures: dict[str, PrefectFuture] = {}
    for spec in specs:
        futures[spec.name] = make_stage_task(root_path, spec, force, slots, executions).submit(
            wait_for=[futures[up] for up in spec.upstream])
    # In order, so the first failed stage's error is the one that fails the flow.
    stages = [futures[spec.name].result() for spec in specs]

    summary = {"root": str(root_path), "git_revision": git_revision(root_path), "stages": stages,
               "wall_time_s": round(time.perf_counter() - started, 3)}
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Condenser pipeline at {summary['git_revision'][:12]}")
    for column in ("stage", "status", "outputs (md5)", "metrics", "wall s"):
        table.add_column(column)
    for s in summary["stages"]:
        table.add_row(
            s["stage"],
            "[green]executed" if s["status"] == "executed" else "[dim]skipped",
            "\n".join(f"{p} {md5[:12]}" for p, md5 in s["outputs"].items()),
            "\n".join(f"{k}={format_value(v)}" for k, v in list(s["metrics"].items())[:6]),
            f"{s['wall_time_s']:.1f}",
        )
    Console(width=140).print(table)
    print(f"total {summary['wall_time_s']:.1f} s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="stages to run with their upstream (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun even up-to-date stages")
    parser.add_argument("--max-parallel", type=int, default=1, help="sibling stages run at once")
    args = parser.parse_args()
    condenser_pipeline(targets=args.targets or None, force=args.force, max_parallel=args.max_parallel)
