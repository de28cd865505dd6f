"""Lineage from `dvc.lock`: which stage made a file, and everything that stage was made from.

`dvc.lock` holds the md5 of every dep and out of every stage that ran; each stage's metrics file
adds the git revision it ran at (under "run"; older outputs keep it in `manifest.json`). Walking deps
backwards from any file gives the chain to the raw inputs, the params of every stage on the way and
the commits, with no server (docs/architecture.md, "Lineage"). The file is read as plain YAML, so this needs
neither DVC nor Prefect.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOCK_FILE = "dvc.lock"
METRICS_DIR = "metrics"


class LineageError(ValueError):
    """A path whose lineage cannot be told; the message says why and what to do."""


@dataclass(frozen=True)
class StageRecord:
    """One stage as `dvc.lock` last recorded it; md5s of folders end in `.dir`."""

    name: str
    cmd: str
    outs: dict[str, str]
    deps: dict[str, str]
    params: dict[str, Any]
    git_revision: str | None

    @property
    def metrics_files(self) -> list[str]:
        return [p for p in self.outs if p.startswith(f"{METRICS_DIR}/") and p.endswith(".json")]


@dataclass
class Lineage:
    """The chain from `path` back to the raw inputs: `stages[0]` produced it, later ones fed it."""

    path: str
    output: str
    md5: str | None
    stages: list[StageRecord]
    raw_inputs: dict[str, str]
    lock_commit: str | None
    upstream: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "path": self.path, "output": self.output, "md5": self.md5, "lock_commit": self.lock_commit,
            "raw_inputs": self.raw_inputs,
            "stages": [{"name": s.name, "cmd": s.cmd, "outs": s.outs, "deps": s.deps, "params": s.params,
                        "git_revision": s.git_revision, "upstream": self.upstream.get(s.name, [])}
                       for s in self.stages],
        }


def find_root(start: Path) -> Path:
    """The DVC project holding `start`: the nearest folder upwards with a `dvc.yaml`."""
    start = Path(start).absolute()
    for folder in [start, *start.parents]:
        if (folder / "dvc.yaml").is_file():
            return folder
    raise LineageError(f"{start}: not inside a DVC project (no dvc.yaml in it or any parent folder)")


def read_lock(root: Path) -> dict[str, StageRecord]:
    """Every stage in `dvc.lock`, by name, in the file's order."""
    root = Path(root)
    lock_path = root / LOCK_FILE
    if not lock_path.is_file():
        raise LineageError(f"{lock_path}: not found; run the pipeline first (`condenser run` or "
                           "`dvc repro`), which records what each stage was made from")
    lock = yaml.safe_load(lock_path.read_text()) or {}
    records = {}
    for name, entry in (lock.get("stages") or {}).items():
        outs = {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}
        records[name] = StageRecord(
            name=name,
            cmd=entry.get("cmd", ""),
            outs=outs,
            deps={d["path"]: d.get("md5", "") for d in entry.get("deps", [])},
            params=entry.get("params", {}),
            git_revision=_run_revision(root, outs),
        )
    return records


def stage_record(root: Path, stage: str) -> StageRecord:
    records = read_lock(root)
    if stage not in records:
        raise LineageError(f"{Path(root) / LOCK_FILE}: no stage '{stage}'; run it first "
                           f"(`dvc repro -s {stage}`)")
    return records[stage]


def trace(path: str | Path, root: Path | None = None) -> Lineage:
    """Lineage of `path`: a stage output, a file inside one, or a metrics file."""
    path = Path(path)
    root = Path(root).absolute() if root else find_root(path)
    rel = _relative(path, root)
    records = read_lock(root)

    producer, output = _producer(records, rel)
    if producer is None:
        raise LineageError(f"{rel}: produced by no stage in {root / LOCK_FILE}; give a stage output "
                           f"(one of: {', '.join(sorted(o for r in records.values() for o in r.outs))}) "
                           "or a file inside one")

    stages, upstream, raw, queue = [], {}, {}, [producer]
    while queue:
        record = queue.pop(0)
        if record in stages:
            continue
        stages.append(record)
        upstream[record.name] = []
        for dep, md5 in record.deps.items():
            feeders = _feeders(records, dep)
            if not feeders:
                raw[dep] = md5
            for feeder in feeders:
                upstream[record.name].append(feeder.name)
                queue.append(feeder)

    md5 = producer.outs[output] if rel == output else _file_md5_in_dir(root, producer.outs[output],
                                                                        Path(rel).relative_to(output))
    return Lineage(path=rel, output=output, md5=md5, stages=stages, raw_inputs=raw,
                   lock_commit=_last_commit(root, LOCK_FILE), upstream=upstream)


# Deps that are code: covered by the commit, not drawn as inputs.
CODE_DIRS = ("condenser", "tasks", "flows")


@dataclass
class LineageGraph:
    """The whole project as `dvc.lock` records it: stages, which stage's output feeds which stage (`edges`:
    producer, consumer, the path), the raw inputs no stage made (path: md5, and who reads them) and the
    deliverables (name: path, the stage that makes it)."""

    stages: dict[str, StageRecord]
    edges: list[tuple[str, str, str]]
    raw: dict[str, str]
    raw_readers: dict[str, list[str]]
    deliverables: dict[str, tuple[str, str]]

    def layers(self) -> dict[str, int]:
        """Each stage's depth: 0 for stages fed by no other stage, else one more than its deepest feeder."""
        feeders: dict[str, set[str]] = {name: set() for name in self.stages}
        for producer, consumer, _ in self.edges:
            feeders[consumer].add(producer)
        depth: dict[str, int] = {}

        def visit(name: str) -> int:
            if name not in depth:
                depth[name] = 1 + max((visit(f) for f in feeders[name]), default=-1)
            return depth[name]

        for name in self.stages:
            visit(name)
        return depth


def lineage_graph(root: Path, deliverables: dict[str, str] | None = None) -> LineageGraph:
    """The lineage of every output in `root`'s `dvc.lock`; `deliverables` (name: path) are marked on it."""
    records = read_lock(root)
    edges, raw, readers = [], {}, {}
    for record in records.values():
        for dep, md5 in record.deps.items():
            feeders = _feeders(records, dep)
            edges += [(feeder.name, record.name, dep) for feeder in feeders if feeder.name != record.name]
            if not feeders and not (dep.endswith(".py") or dep.split("/", 1)[0] in CODE_DIRS):
                raw[dep] = md5
                readers.setdefault(dep, []).append(record.name)
    made = {}
    for name, path in (deliverables or {}).items():
        maker, _ = _producer(records, path)
        if maker is not None:
            made[name] = (path, maker.name)
    return LineageGraph(stages=records, edges=edges, raw=raw, raw_readers=readers, deliverables=made)


def to_mermaid(graph: LineageGraph) -> str:
    """A Mermaid flowchart: raw inputs, stages with their outputs' md5s, deliverables; edges name the path."""
    ids = {name: f"s{i}" for i, name in enumerate(graph.stages)}
    lines = ["flowchart LR"]
    for i, (path, md5) in enumerate(graph.raw.items()):
        lines.append(f'  r{i}[("{path}<br/>{_short(md5)}")]')
        lines += [f"  r{i} --> {ids[reader]}" for reader in graph.raw_readers[path]]
    for name, record in graph.stages.items():
        outs = "<br/>".join(f"{out} {_short(md5)}" for out, md5 in record.outs.items()
                            if not out.startswith(("metrics/", "plots/")))
        lines.append(f'  {ids[name]}["<b>{name}</b><br/>{outs}"]')
    for producer, consumer, path in graph.edges:
        lines.append(f"  {ids[producer]} -->|{path}| {ids[consumer]}")
    for i, (name, (path, maker)) in enumerate(graph.deliverables.items()):
        lines.append(f'  d{i}[/"deliverable <b>{name}</b><br/>{path}"/]')
        lines.append(f"  {ids[maker]} --> d{i}")
    return "\n".join(lines)


def draw(graph: LineageGraph, highlight: set[str] = frozenset()) -> bytes:
    """The graph as a PNG, stages in columns by depth (raw inputs left, deliverables' compression right);
    `highlight` (stages that ran in this run) drawn filled."""
    import io

    import matplotlib
    import networkx as nx

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = graph.layers()
    columns: dict[int, list[str]] = {}
    for name in graph.stages:
        columns.setdefault(depth[name], []).append(name)
    # Raw inputs get the column before the first stage.
    if graph.raw:
        columns = {k + 1: v for k, v in columns.items()} | {0: [f"raw:{p}" for p in graph.raw]}
        depth = {k: v + 1 for k, v in depth.items()}
    height = max(len(v) for v in columns.values())
    position = {}
    for col, names in columns.items():
        for row, name in enumerate(names):
            position[name] = (col * 3.2, (height - 1) / 2 - row + (len(names) - 1) / 2 - (height - 1) / 2)
    fig, ax = plt.subplots(figsize=(max(8, 2.4 * len(columns)), max(4, 0.9 * height)))
    dag = nx.DiGraph([(p, c) for p, c, _ in graph.edges]
                     + [(f"raw:{p}", r) for p, rs in graph.raw_readers.items() for r in rs])
    # Only the edges no longer path implies: the evaluator feeds most stages, and drawn directly it would
    # hide the chain. The Mermaid text keeps every edge.
    for producer, consumer in nx.transitive_reduction(dag).edges:
        (x0, y0), (x1, y1) = position[producer], position[consumer]
        ax.annotate("", xy=(x1 - 1.05, y1), xytext=(x0 + 1.05, y0),
                    arrowprops=dict(arrowstyle="->", color="#7a7a7a", lw=0.8, shrinkA=0, shrinkB=0,
                                    connectionstyle="arc3,rad=0.0"))
    for name, (x, y) in position.items():
        if name.startswith("raw:"):
            label, face = f"{name[4:]}\n{_short(graph.raw[name[4:]])}", "#fff4d6"
        else:
            outs = [f"{_short(md5)}" for out, md5 in graph.stages[name].outs.items()
                    if not out.startswith(("metrics/", "plots/"))]
            made = [d for d, (_, maker) in graph.deliverables.items() if maker == name]
            label = name + (f"\n{outs[0]}" if outs else "") + (f"\n\u2192 {', '.join(made)}" if made else "")
            face = "#cfe3ff" if name in highlight else "#f2f2f2"
        ax.text(x, y, label, ha="center", va="center", fontsize=7, family="monospace",
                bbox=dict(boxstyle="round,pad=0.35", fc=face, ec="#4a6fa5" if name in highlight else "#9a9a9a"))
    xs = [x for x, _ in position.values()]
    ys = [y for _, y in position.values()]
    ax.set_xlim(min(xs) - 1.6, max(xs) + 1.6)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.axis("off")
    ax.set_title("Lineage from dvc.lock (filled: ran in this run; md5 of each output; \u2192 deliverables; "
                 "edges a longer path implies left out)",
                 fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _short(md5: str) -> str:
    return md5.removesuffix(".dir")[:8] + ("/" if md5.endswith(".dir") else "")


def render(lineage: Lineage) -> str:
    """The chain as indented text, producer first."""
    lines = [f"{lineage.path}" + (f"  md5 {lineage.md5}" if lineage.md5 else "")
             + (f"  (inside {lineage.output})" if lineage.path != lineage.output else "")]
    if lineage.lock_commit:
        lines.append(f"dvc.lock last committed at {lineage.lock_commit}")
    for record in lineage.stages:
        lines += ["", f"stage {record.name}: {record.cmd}",
                  f"  commit  {record.git_revision or 'unknown (no run record in its metrics)'}"]
        if lineage.upstream.get(record.name):
            lines.append(f"  after   {', '.join(lineage.upstream[record.name])}")
        lines.append("  outputs")
        lines += [f"    {md5}  {p}" for p, md5 in record.outs.items()]
        lines.append("  inputs")
        lines += [f"    {md5}  {p}" for p, md5 in record.deps.items()]
        for params_file, values in record.params.items():
            lines.append(f"  params ({params_file})")
            lines += [f"    {k} = {json.dumps(v)}" for k, v in flatten(values).items()]
    lines += ["", "raw inputs (produced by no stage)"]
    lines += [f"  {md5}  {p}" for p, md5 in sorted(lineage.raw_inputs.items())]
    return "\n".join(lines)


def read_metrics(root: Path, record: StageRecord) -> dict[str, Any]:
    """The stage's metrics files, flattened to `file-less dotted key -> value`."""
    metrics: dict[str, Any] = {}
    for rel in record.metrics_files:
        path = Path(root) / rel
        if path.is_file():
            metrics.update(flatten(json.loads(path.read_text())))
    return metrics


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _relative(path: Path, root: Path) -> str:
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        return absolute.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise LineageError(f"{path}: outside the DVC project at {root}") from None


def _producer(records: dict[str, StageRecord], rel: str) -> tuple[StageRecord | None, str | None]:
    """The stage whose out is `rel` or a folder holding it."""
    for record in records.values():
        for out in record.outs:
            if rel == out or rel.startswith(out.rstrip("/") + "/"):
                return record, out
    return None, None


def _feeders(records: dict[str, StageRecord], dep: str) -> list[StageRecord]:
    """The stages whose outputs a dep reads: the one whose out holds it, or every one whose out lies inside it
    (a dep on `data/lora` reads each `lora@<concept>`'s folder)."""
    record, _ = _producer(records, dep)
    if record is not None:
        return [record]
    inside = dep.rstrip("/") + "/"
    return [r for r in records.values() if any(out.startswith(inside) for out in r.outs)]


def _run_revision(root: Path, outs: dict[str, str]) -> str | None:
    """The commit a stage ran at: its metrics file's run record, else (older outputs) its manifest."""
    for out in outs:
        path = root / out
        if out.startswith(f"{METRICS_DIR}/") and out.endswith(".json") and path.is_file():
            run = json.loads(path.read_text()).get("run")
            if isinstance(run, dict) and run.get("git_revision"):
                return run["git_revision"]
    for out, md5 in outs.items():
        manifest = root / out / "manifest.json"
        if md5.endswith(".dir") and manifest.is_file():
            return json.loads(manifest.read_text()).get("git_revision")
    return None


def _file_md5_in_dir(root: Path, dir_md5: str, relpath: Path) -> str | None:
    """A file's md5 from the `.dir` listing DVC keeps in its cache for the folder holding it."""
    if not dir_md5.endswith(".dir"):
        return None
    listing = root / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]
    if not listing.is_file():
        return None
    for entry in json.loads(listing.read_text()):
        if entry["relpath"] == relpath.as_posix():
            return entry["md5"]
    return None


def _last_commit(root: Path, rel: str) -> str | None:
    try:
        sha = subprocess.run(["git", "log", "-1", "--format=%H", "--", rel], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha or None
