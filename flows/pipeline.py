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

import base64
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import chdir, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, runtime, task
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

from condenser.core.config import FlowParams
from condenser.core.environment import git_revision
from condenser.core.stage import INPUT_ERROR
from condenser.lineage import flatten, format_value, lineage_graph, read_lock, read_metrics

EXPECTATIONS_FILE = "expectations.json"
# validate's pass/fail table and the report's page, published as they are written.
TABLE_FILE = "table.md"
REPORT_FILES = ("report.md", "report.html")
# A tqdm frame: "  40%|████      | 400/1000 [...]".
PROGRESS_FRAME = re.compile(r"\d+%\|")
# How much of a failed stage's output goes into the error that fails the flow.
ERROR_TAIL_LINES = 40


# One pipeline run per checkout at a time: held for the whole run (stage by stage, DVC's own lock is free
# between two stages, and a second run would interleave its stages with the first's). The OS releases it
# when the holder dies, SIGKILL included.
PIPELINE_LOCK = ".dvc/tmp/condenser-pipeline.lock"
# Failures a retry can help: another DVC process holds the lock, the stage was killed by a signal (OOM
# killer, preemption), memory ran out. An input error (exit INPUT_ERROR) or a bug fails the same way again.
TRANSIENT = re.compile(r"Unable to acquire lock|is busy, it is being blocked by|exited with -\d+|exited with 13[0-9]"
                       r"|MemoryError|out of memory")


class StageFailed(RuntimeError):
    """`dvc repro -s <stage>` exited non-zero; the message holds the end of its output. `transient` says
    whether a retry may help (TRANSIENT)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class PipelineBusy(RuntimeError):
    """Another pipeline run holds this checkout's lock."""


class CheckoutMismatch(RuntimeError):
    """The run was asked for a commit the working tree is not at."""


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
    return plan(root, targets, status=False)[0]


def plan(root: Path, targets: list[str] | None = None, status: bool = True) -> tuple[list[StageSpec], set[str]]:
    """The stages to run (as `stage_graph`) and, with `status`, those DVC finds out of date, from one load of
    DVC's project: a no-op run pays for it once."""
    import networkx as nx
    from dvc.dependency.param import ParamsDependency
    from dvc.lock import LockError
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
        try:
            # The whole project's status, then the selection: DVC answers for every stage at once in a
            # fraction of the time it takes stage by stage (1.7 s against 7.6 s for this project's 31).
            stale = set(repo.status()) & set(order) if status and order else set()
        except LockError as err:
            # Another DVC process (a `dvc repro` beside this run, or one killed and not yet reaped by its
            # parent) holds an output: DVC's message names it.
            raise PipelineBusy(f"DVC's lock is held: {err}") from None
    return specs, stale


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

    def __init__(self, root: Path, specs: list[StageSpec], force: bool, stale: set[str] | None = None):
        self.root, self.force = root, force
        if stale is None and not force:
            stale = set(stale_stages(root, [s.name for s in specs]))
        self.stale = set() if force else stale
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
            tail.append(line)
            # A progress bar redrawn in place arrives as one line per frame: the log keeps the finished ones.
            if PROGRESS_FRAME.search(line) and "100%|" not in line:
                continue
            log(line)
    if proc.returncode != 0:
        output = "\n".join(tail)
        input_error = f"exited with {INPUT_ERROR}" in output
        transient = not input_error and (proc.returncode < 0 or bool(TRANSIENT.search(output)))
        raise StageFailed(f"stage {stage} failed: `{' '.join(cmd[1:])}` exited {proc.returncode}\n{output}",
                          transient=transient)


def stage_report(root: Path, spec: StageSpec, executed: bool, wall_time_s: float, lock: LockCache) -> dict:
    """Plain data about one stage after its run: what it made, from what, and how well."""
    record = lock.record(spec.name)
    return {
        "stage": spec.name,
        "status": "executed" if executed else "skipped",
        "outputs": {p: record.outs.get(p, "") for p in spec.outs},
        "inputs": record.deps,
        "params": {k: v for values in record.params.values() for k, v in flatten(values).items()},
        "metrics": read_metrics(root, record),
        "git_revision": record.git_revision or lock.revision,
        "wall_time_s": round(wall_time_s, 3),
    }


class LockCache:
    """`dvc.lock` read once per flow run, and again only after a stage rewrote it: on a run where nothing
    executes, one read serves every stage."""

    def __init__(self, root: Path):
        self.root = root
        self.revision = git_revision(root)
        self.records = read_lock(root) if (root / "dvc.lock").is_file() else {}
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            self.records = read_lock(self.root)

    def record(self, stage: str):
        with self.lock:
            if stage not in self.records:
                raise StageFailed(f"stage {stage}: not in {self.root / 'dvc.lock'} after it ran")
            return self.records[stage]


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


def publish_run(root: Path, specs: list[StageSpec], reports: list[dict | None], trigger: dict) -> None:
    """The flow run's own artifacts: its lineage (the whole project from dvc.lock: a graph image, Mermaid
    text and one row per output, with the commit and branch the run was for) and its report (each stage:
    ran, up to date, failed or not reached; outputs; headline metrics; the one-page report when it exists)."""
    from condenser.lineage import to_mermaid

    ran = {r["stage"] for r in reports if r and r["status"] == "executed"}
    header = ["| run | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in trigger.items() if v]
    if (root / "dvc.lock").is_file():
        graph = lineage_graph(root, _deliverable_paths(root))
        png = base64.b64encode(_lineage_png(root, graph, ran)).decode()
        create_image_artifact(image_url=f"data:image/png;base64,{png}", key="pipeline-lineage-graph",
                              description="Lineage graph of this run (from dvc.lock): raw inputs, stages with "
                                          "the md5 of their outputs, deliverables; stages that ran are filled")
        rows = ["| stage | output | md5 | from |", "|---|---|---|---|"]
        for name, record in graph.stages.items():
            feeders = sorted({p for p, c, _ in graph.edges if c == name})
            for out, md5 in record.outs.items():
                rows.append(f"| {name} | {out} | `{md5}` | {', '.join(feeders)} |")
        made = [f"- **{d}**: `{path}` (made by `{maker}`)" for d, (path, maker) in graph.deliverables.items()]
        params = [f"- **{name}**: " + ", ".join(f"`{k}={format_value(v)}`" for values in record.params.values()
                                                for k, v in flatten(values).items())
                  for name, record in graph.stages.items() if record.params]
        create_markdown_artifact(
            key="pipeline-lineage",
            markdown="\n".join(["# Lineage of this run", "", *header, "", "## Deliverables", "", *made, "",
                                "## Every output (dvc.lock)", "", *rows, "", "## Params per stage", "", *params, "",
                                "## Graph (Mermaid: paste into any Mermaid viewer)", "", "```mermaid",
                                to_mermaid(graph), "```"]),
            description=f"Lineage from the raw data to every deliverable, md5s and params, at "
                        f"{trigger.get('revision', '')[:12]}")
    by_name = {r["stage"]: r for r in reports if r}
    rows = ["| stage | status | outputs (md5) | metrics | wall s |", "|---|---|---|---|---|"]
    for spec in specs:
        r = by_name.get(spec.name)
        if r is None:
            rows.append(f"| {spec.name} | **failed or not reached** | | | |")
            continue
        outs = "<br>".join(f"{p} `{md5[:12]}`" for p, md5 in r["outputs"].items())
        headline = [(k, v) for k, v in r["metrics"].items() if not k.startswith("run.")][:4]
        metrics = "<br>".join(f"{k}={format_value(v)}" for k, v in headline)
        rows.append(f"| {spec.name} | {r['status']} | {outs} | {metrics} | {r['wall_time_s']:.1f} |")
    page = root / "data" / "report" / "report.html"
    more = [f"The one-page report: `{page}` (the `report-page` artifact shows it)."] if page.is_file() else []
    create_markdown_artifact(key="pipeline-report",
                             markdown="\n".join(["# Pipeline run", "", *header, "", *rows, "", *more]),
                             description=f"{len(ran)} of {len(specs)} stages ran; the rest were up to date, "
                                         "failed or not reached")


def _lineage_png(root: Path, graph, ran: set[str]) -> bytes:
    """The graph's PNG, drawn once per dvc.lock and set of stages that ran: a no-op run reuses the last one
    (drawing imports matplotlib, seconds of a run that otherwise costs a few)."""
    from condenser.lineage import draw

    key = hashlib.md5((root / "dvc.lock").read_bytes() + json.dumps(
        [sorted(ran), sorted(graph.deliverables.items())]).encode()).hexdigest()[:16]
    cache = root / ".dvc" / "tmp" / f"condenser-lineage-{key}.png"
    if cache.is_file():
        return cache.read_bytes()
    png = draw(graph, highlight=ran)
    for old in cache.parent.glob("condenser-lineage-*.png"):
        old.unlink(missing_ok=True)
    cache.write_bytes(png)
    return png


def _deliverable_paths(root: Path) -> dict[str, str]:
    try:
        raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
        return {name: d["path"] for name, d in (raw.get("deliverables") or {}).items()}
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        # The lineage is drawn whatever params.yaml holds; the stages report what is wrong with it.
        return {}


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
                    executions: Executions, lock: LockCache, flow_params: FlowParams):
    """The Prefect task for one stage; a materializing task when the stage has artifact outputs.

    Metrics and plots are not assets: they go into the metadata and artifacts, and as assets Prefect
    would pass them on as upstream of every downstream stage. A stage DVC finds up to date is not run at
    all (no `dvc repro` process): that is what keeps a no-op flow run fast.
    """
    assets = [_asset(root, p) for p in spec.artifacts]

    def run_stage() -> Any:
        logger = get_run_logger()
        with slots:
            # Timed from here: the wait for a slot is not the stage's cost.
            started = time.perf_counter()
            executed = executions.will_execute(spec)
            if executed:
                dvc_repro(root, spec.name, force, logger.info)
                lock.refresh()
        if executed:
            executions.record(spec)
        report = stage_report(root, spec, executed, time.perf_counter() - started, lock)
        if executed:
            for asset in assets:
                add_asset_metadata(asset, {"md5": report["outputs"][asset.properties.name],
                                           "params": report["params"], "metrics": report["metrics"],
                                           "git_revision": report["git_revision"], "stage": spec.name})
        if executed:
            publish_artifacts(root, spec, report)
            return report
        # An up-to-date stage publishes nothing of its own: the run's pipeline-lineage and pipeline-report
        # hold its outputs, md5s and params (and a no-op run of 31 stages saves 60-odd API calls).
        logger.info(f"Stage '{spec.name}' is up to date (DVC): not rerun")
        # Prefect emits no asset event for a Cached task: an up-to-date stage materialized nothing.
        return Completed(name="Cached", message="DVC: stage up to date, not rerun", data=report)

    options = dict(name=spec.name, cache_policy=NO_CACHE, persist_result=False,
                   retries=flow_params.retries_for(spec.name), retry_delay_seconds=flow_params.retry_delay_s,
                   retry_condition_fn=_retry_helps)
    if not assets:
        return task(run_stage, **options)
    return materialize(*assets, asset_deps=[_asset(root, d) for d in spec.data_deps], by="dvc",
                       **options)(run_stage)


def _retry_helps(task, task_run, state) -> bool:
    """Prefect's retry condition: only a transient failure (StageFailed.transient) is worth another try."""
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:
        return False
    return False


def flow_params(root: Path, specs: list[StageSpec]) -> FlowParams:
    """params.yaml's `flow` section, checked against the stages. Other sections are the stages' own to check
    (each validates the whole file before any work), so a mistake there fails its stage with its message."""
    path = root / "params.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    try:
        params = FlowParams(**(raw.get("flow") or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: flow: {err}") from None
    known = {s.name for s in specs} | {s.name.split("@", 1)[0] for s in specs} | {"default"}
    unknown = sorted(set(params.retries) - known)
    if unknown:
        everything = _all_stage_names(root)
        unknown = [name for name in unknown if name not in everything]
    if unknown:
        raise ValueError(f"{path}: flow.retries: no stage or stage group named {', '.join(unknown)}; use a "
                         f"stage (validate@cpu), a group (validate) or default")
    return params


def _all_stage_names(root: Path) -> set[str]:
    # A retries entry for a stage outside this run's selection is fine: the stage exists.
    names = {s.name for s in stage_graph(root)}
    return names | {n.split("@", 1)[0] for n in names} | {"default"}


def check_checkout(root: Path, sha: str | None, branch: str | None) -> str:
    """The working tree's revision; with `sha`, refuse unless the tree is exactly at it (HEAD is that commit
    and no tracked input differs from it), so a triggered run computes what its commit says."""
    revision = git_revision(root)
    if not sha:
        return revision
    head = revision.removesuffix("-dirty")
    if len(sha) < 7 or not head.startswith(sha.lower()):
        raise CheckoutMismatch(
            f"refusing to run: this run is for commit {sha[:12]}{f' on {branch}' if branch else ''}, but the "
            f"working tree at {root} is at {head[:12]}; check out that commit there (`git checkout {sha}`), "
            "or start a run without a sha to run what is checked out")
    if revision.endswith("-dirty"):
        raise CheckoutMismatch(
            f"refusing to run: the working tree at {root} is at {sha[:12]} but has uncommitted changes to "
            "tracked files (`git status`); commit or stash them, so the run computes what the commit says")
    return revision


@contextmanager
def pipeline_lock(root: Path, wait: bool, log) -> Any:
    """Hold this checkout's pipeline lock for the whole run; refuse (or wait, with `wait`) if another run has it."""
    path = root / PIPELINE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                raise PipelineBusy(f"another pipeline run holds {path} ({holder}); wait for it to finish, or "
                                   "start this one with --wait (`condenser run --wait`) to queue behind it") from None
            log(f"waiting for the pipeline lock {path}, held by {holder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, flow run {runtime.flow_run.name or '-'}, "
                     f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


@flow(name="condenser-pipeline", log_prints=True, persist_result=False)
def condenser_pipeline(root: str = ".", targets: list[str] | None = None, force: bool = False,
                       max_parallel: int = 1, sha: str | None = None, branch: str | None = None,
                       wait: bool = False) -> dict:
    """Run the DVC stages (all, or `targets` and their upstream) as Prefect tasks, upstream first.

    Sibling stages may run side by side, at most `max_parallel` at once. The default is one: on a
    single machine, parallel stages share its cores and each trains with all of them, so running
    several at once is slower than running them in turn. Raise it when stages get their own GPUs.
    `sha` and `branch` come with a triggered run (a commit): the run refuses a working tree that is not at
    that commit, and records both in its lineage. `wait` queues behind another run of this checkout
    instead of refusing.
    """
    started = time.perf_counter()
    root_path = Path(root).absolute()
    logger = get_run_logger()
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
    revision = check_checkout(root_path, sha, branch)
    with pipeline_lock(root_path, wait, logger.info):
        # Asked under the lock: a run this one waited for may have just brought stages up to date.
        locked = time.perf_counter()
        specs, stale = plan(root_path, targets, status=not force)
        params = flow_params(root_path, specs)
        planned = time.perf_counter()
        slots = threading.BoundedSemaphore(max_parallel)
        executions = Executions(root_path, specs, force, stale)
        lock = LockCache(root_path)
        futures: dict[str, PrefectFuture] = {}
        for spec in specs:
            futures[spec.name] = make_stage_task(root_path, spec, force, slots, executions, lock, params).submit(
                wait_for=[futures[up] for up in spec.upstream])
        # In order, so the first failed stage's error is the one that fails the flow.
        try:
            stages = [futures[spec.name].result() for spec in specs]
        finally:
            # Whatever ran (or failed), the run's lineage and report say so.
            trigger = {"sha": sha, "branch": branch, "revision": revision,
                       "flow_run": runtime.flow_run.name, "deployment": runtime.deployment.name}
            finished = [f.state.result(raise_on_failure=False) if f.state.is_completed() else None
                        for f in (futures[spec.name] for spec in specs)]
            staged = time.perf_counter()
            publish_run(root_path, specs, finished, trigger)

    # Where a run's time goes (bench/pipeline.py reports it for no-op runs).
    timings = {"lock_wait_s": locked - started, "plan_s": planned - locked, "stages_s": staged - planned,
               "publish_run_s": time.perf_counter() - staged}
    summary = {"root": str(root_path), "git_revision": revision, "sha": sha, "branch": branch, "stages": stages,
               "wall_time_s": round(time.perf_counter() - started, 3),
               "timings": {k: round(v, 3) for k, v in timings.items()}}
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
    print(f"timings {json.dumps(summary['timings'])}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="stages to run with their upstream (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun even up-to-date stages")
    parser.add_argument("--max-parallel", type=int, default=1, help="sibling stages run at once")
    parser.add_argument("--wait", action="store_true", help="queue behind another run of this checkout")
    args = parser.parse_args()
    condenser_pipeline(targets=args.targets or None, force=args.force, max_parallel=args.max_parallel,
                       wait=args.wait)
