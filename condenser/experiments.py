"""Experiments side by side (`condenser compare`): per deliverable the quality, size and latency that the baseline
and each experiment reached, and the params that differ between them.

`dvc exp run -S key=value [stage]` reruns what the change touches and keeps the result as a git ref;
`dvc exp show` returns, for the workspace, the baseline commit and each experiment, the params files and every
metrics file as that revision holds them. Each revision's figures are the report's chains
(condenser.report.collect) built from its own metrics, so an experiment reads the same as its report would: every
level (dense, the variant `sparse.chain` names, int8 per runtime) from the most downstream stage that measured it
(validate on `report.target`, int8 on another runtime from the target that runs it; else quantize, else sparse),
and a student's latency per image (its UNet calls times one call's median). The teacher row, the reference of
every chain, is left out: an experiment changes what is compressed, and its figures are in the report.

A library module: DVC's Python API, no Prefect.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import chdir
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condenser.core.config import PARAMS_FILE, parse_params
from condenser.core.errors import ConfigError, DataError
from condenser.lineage import flatten

# The chain's steps as levels (validate's names); "teacher" is not a level of the deliverable.
LEVELS = {"distilled": "dense", "sparse": "sparse", "int8": "int8"}
BASELINE, EXPERIMENT, WORKSPACE = "baseline", "experiment", "workspace"
EXAMPLE = "dvc exp run validate@cpu -S targets.cpu.repeats=50"
# The metrics of the stages that measure a deliverable (the chain's sizes and latencies come from these).
MEASURED = ("metrics/validate/", "metrics/quantize/", "metrics/sparse/")


class CompareError(ValueError):
    """Nothing to compare; the message names the folder and what to run."""


@dataclass
class Revision:
    """One column of the comparison: the baseline commit, an experiment or the workspace, as `dvc exp show`
    returned it."""

    name: str
    rev: str
    kind: str
    raw_params: dict[str, Any]
    params: dict[str, Any]
    metrics: dict[str, Any]
    workspace: bool = False
    model: dict = field(default_factory=dict)


def exp_show(root: Path) -> list[dict]:
    """`dvc exp show --json` of the project at `root`: the workspace, HEAD's commit (the baseline) and the
    experiments run on it."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root)
    if not (root / ".dvc").is_dir():
        raise CompareError(f"{root}: not a DVC project (no .dvc folder); pass --root <the folder holding dvc.yaml>")
    try:
        # Repo resolves dvc.yaml against the working directory, not its argument.
        with chdir(root), Repo(os.fspath(root)) as repo:
            return [state.dumpd() for state in repo.experiments.show()]
    except DvcException as err:
        raise CompareError(f"{root}: `dvc exp show` failed: {str(err).rstrip('.')}. Experiments are git refs on a "
                           "commit: the project must be a git repository with dvc.yaml and params.yaml committed"
                           ) from None


def revisions(states: list[dict]) -> tuple[list[Revision], list[dict]]:
    """The revisions that hold results, in `dvc exp show`'s order (workspace folded into the revision it equals),
    and the ones left out with the reason (queued, running, failed, unreadable)."""
    found: list[Revision] = []
    skipped: list[dict] = []

    def add(state: dict, name: str, kind: str, executor: dict | None = None) -> None:
        data, error = state.get("data"), state.get("error")
        running = (executor or {}).get("state")
        if running not in (None, "success"):
            skipped.append({"name": name, "rev": state["rev"], "reason": f"experiment {running}"})
        elif error or not data:
            skipped.append({"name": name, "rev": state["rev"], "reason": (error or {}).get("msg") or "no results"})
        else:
            raw = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
            found.append(Revision(name, state["rev"], kind, raw, _params(data.get("params") or {}),
                                  {p: m["data"] for p, m in (data.get("metrics") or {}).items() if "data" in m}))

    for state in states:
        if state["rev"] == WORKSPACE:
            add(state, WORKSPACE, WORKSPACE)
            continue
        add(state, state.get("name") or state["rev"][:7], BASELINE)
        for exp in state.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev, rev.get("name") or exp.get("name") or rev["rev"][:7], EXPERIMENT, exp.get("executor"))
    # `dvc exp run` applies its results to the workspace: the workspace then is that experiment, not a column.
    workspace = next((r for r in found if r.kind == WORKSPACE), None)
    same = next((r for r in found if workspace and r is not workspace and r.params == workspace.params
                 and r.metrics == workspace.metrics), None)
    if same is not None:
        found.remove(workspace)
        same.workspace = True
    return found, skipped


def _params(files: dict) -> dict[str, Any]:
    """Every params file's values as dotted keys (params.yaml's bare, another file's as `file:key`)."""
    out: dict[str, Any] = {}
    for file, result in files.items():
        if "data" in result:
            out.update(flatten(result["data"] or {}, "" if file == PARAMS_FILE else f"{file}:"))
    return out


def figures(rev: Revision) -> dict:
    """The report's model of one revision (condenser.report.collect), built from its metrics as exp show gave
    them: written into a scratch root, the layout collect reads."""
    from condenser.report import collect

    params = parse_params(rev.raw_params, f"{PARAMS_FILE} of {rev.name}")
    with tempfile.TemporaryDirectory(prefix="condenser-compare-") as tmp:
        for rel, content in rev.metrics.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                continue  # a metrics file outside the project is no stage's
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content))
        return collect(Path(tmp), params)


def differing(revs: list[Revision]) -> dict[str, dict[str, Any]]:
    """The params whose value is not the same in every revision: key -> revision name -> value (None: absent)."""
    keys = dict.fromkeys(k for r in revs for k in r.params)
    out = {}
    for key in keys:
        values = {r.name: r.params.get(key) for r in revs}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out[key] = values
    return out


def compare(root: Path) -> dict:
    """The comparison of the project at `root` (a plain dict, what `condenser compare --json` prints)."""
    root = Path(root)
    revs, skipped = revisions(exp_show(root))
    baseline = next((r for r in revs if r.kind == BASELINE), None)
    if not any(r.kind == EXPERIMENT for r in revs):
        on = f" on {baseline.name} ({baseline.rev[:7]})" if baseline else ""
        raise CompareError(f"{root}: no experiments{on} to compare; run one with a changed param, e.g. `{EXAMPLE}`, "
                           "then `condenser compare`")
    if not any(rel.startswith(MEASURED) for r in revs for rel in r.metrics):
        raise CompareError(_nothing_measured(root))
    kept = []
    for r in sorted(revs, key=lambda r: (BASELINE, EXPERIMENT, WORKSPACE).index(r.kind)):
        try:
            r.model = figures(r)
        except (ConfigError, DataError) as err:
            skipped.append({"name": r.name, "rev": r.rev, "reason": str(err)})
            continue
        kept.append(r)
    deliverables = _deliverables(kept)
    if not any(d["rows"] for d in deliverables):
        raise CompareError(_nothing_measured(root))
    return {"root": str(root), "baseline": baseline.name if baseline else None,
            "experiments": [{"name": r.name, "rev": r.rev, "kind": r.kind, "workspace": r.workspace,
                             "report_target": r.model["target"], "targets": _gates(r.model)} for r in kept],
            "params": differing(kept), "deliverables": deliverables, "skipped": skipped}


def _nothing_measured(root: Path) -> str:
    return (f"{root}: no deliverable figures in any revision's metrics ({', '.join(MEASURED)}); run the pipeline "
            f"through validate first (`dvc repro validate`), then experiments (`{EXAMPLE}`)")


def _gates(model: dict) -> dict[str, dict]:
    return {t["name"]: {"status": t["status"], **(t.get("counts") or {})} for t in model["targets"]}


def _deliverables(revs: list[Revision]) -> list[dict]:
    """Per deliverable (in the baseline's order, then any an experiment added) one row per level and revision,
    grouped by level so that the revisions of a level sit together."""
    chains: dict[str, dict] = {}
    rows: dict[str, dict[tuple, list[dict]]] = {}
    for r in revs:
        for c in r.model["deliverables"]:
            chains.setdefault(c["name"], c)
            levels = rows.setdefault(c["name"], {})
            for row in c["rows"]:
                # A step no stage measured (a run that stopped before it) has no figure to compare.
                if row["step"] not in LEVELS or not (row["quality"] or row["size_bytes"] or row["latency_ms"]):
                    continue
                entry = {"experiment": r.name, "level": LEVELS[row["step"]], "runtime": row["runtime"],
                         "label": "dense" if row["step"] == "distilled" else row["label"],
                         "quality": row["quality"], "size_bytes": row["size_bytes"], "latency_ms": row["latency_ms"],
                         "latency_per_call_ms": row["latency_per_call_ms"], "source": row["source"],
                         "vs_dense": row["vs_dense"]}
                levels.setdefault(_level(entry), []).append(entry)
    return [{"name": n, "kind": c["kind"], "latency_unit": c["latency_unit"],
             "quality_metrics": c["quality_metrics"],
             "rows": [row for level in rows[n].values() for row in level]} for n, c in chains.items() if rows[n]]


def tables(comparison: dict) -> list:
    """Rich tables for the terminal: the experiments (params that differ, each target's gate), then one per
    deliverable: each level's quality, size and latency per experiment, with the change from the baseline."""
    from rich.table import Table

    from condenser.report.render import ARROW, fmt_bytes, fmt_ms, fmt_num

    exps = comparison["experiments"]
    names = [e["name"] for e in exps]
    head = Table(title=f"Experiments in {comparison['root']}")
    head.add_column("param / gate")
    for e in exps:
        head.add_column(f"{e['name']}\n{e['kind']} {e['rev'][:7]}" + (" (workspace)" if e["workspace"] else ""))
    for key, values in comparison["params"].items():
        head.add_row(key, *(_value(values.get(n)) for n in names))
    head.add_section()
    for t in dict.fromkeys(t for e in exps for t in e["targets"]):
        gates = [e["targets"].get(t) for e in exps]
        head.add_row(f"validate@{t}", *(_gate(g) for g in gates))
    out = [head]
    for d in comparison["deliverables"]:
        metrics = list(d["quality_metrics"])
        table = Table(title=f"{d['name']} ({d['kind']}); latency: {d['latency_unit']}")
        table.add_column("level", no_wrap=True)
        table.add_column("experiment", no_wrap=True)
        for column in (*(f"{m} {ARROW.get(d['quality_metrics'][m], '')}" for m in metrics), "size",
                       "latency p50 (ms)"):
            table.add_column(column, overflow="fold")
        table.add_column("from (metrics/)", style="dim")
        rows = d["rows"]
        refs = {_level(r): r for r in rows if r["experiment"] == comparison["baseline"]}
        for i, row in enumerate(rows):
            ref = refs.get(_level(row))
            ref = None if ref is row else ref
            table.add_row(row["label"], row["experiment"],
                          *(_change(fmt_num, row["quality"].get(m), (ref or {}).get("quality", {}).get(m))
                            for m in metrics),
                          _change(fmt_bytes, row["size_bytes"], (ref or {}).get("size_bytes")),
                          _change(fmt_ms, row["latency_ms"], (ref or {}).get("latency_ms")),
                          row["source"].replace("metrics/", "").replace(".json", ""),
                          end_section=i + 1 == len(rows) or _level(rows[i + 1]) != _level(row))
        out.append(table)
    return out


def _gate(g: dict | None) -> str:
    if not g:
        return "—"
    if g["status"] == "skipped":
        return "skipped"
    return f"{g['status']} ({g.get('pass', 0)} pass, {g.get('fail', 0)} fail)"


def _level(row: dict) -> tuple[str, str | None]:
    return row["level"], row["runtime"]


def _change(fmt, value: Any, baseline: Any) -> str:
    """A figure, and its change from the baseline's when there is one and it moved."""
    from condenser.report.collect import ratio

    r = ratio(value, baseline)
    return fmt(value) + (f" ({(r - 1) * 100:+.1f}%)" if r is not None and abs(r - 1) >= 5e-4 else "")


def _value(v: Any) -> str:
    return "—" if v is None else json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)
