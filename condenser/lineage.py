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
            feeder, _ = _producer(records, dep)
            if feeder is None:
                raw[dep] = md5
            else:
                upstream[record.name].append(feeder.name)
                queue.append(feeder)

    md5 = producer.outs[output] if rel == output else _file_md5_in_dir(root, producer.outs[output],
                                                                        Path(rel).relative_to(output))
    return Lineage(path=rel, output=output, md5=md5, stages=stages, raw_inputs=raw,
                   lock_commit=_last_commit(root, LOCK_FILE), upstream=upstream)


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
