"""validate@<target>: every deliverable at every compression level run (or estimated) on one hardware target
and checked against the target's budgets; `gate: fail` fails the stage when a budget is broken.

    python -m tasks.validate TARGET      (TARGET: a key of `targets:` in params.yaml)

The levels are the ones that exist: dense (the deliverable as distilled), sparse (the variant
`sparse.chain` names, when it is not dense) and int8 (quantize's deployed files). Measured targets run the
files (cpu: ONNX Runtime; mobile: ExecuTorch/XNNPACK; cuda: PyTorch on a CUDA device, skipped with its
reason where there is none) and compare each with its PyTorch model; virtual targets (mcu, npu, dataflow)
estimate from the ONNX graph. Every level gets its size, peak activation memory (a liveness pass over the
ONNX graph, int8 at one byte; ExecuTorch's memory planner beside it where a .pte exists), operators and
quality (the kind's metrics of that level as sparse and quantize measured them on this runtime, and the drop
against the teacher). A row that breaks a budget says which, by how much, and which node for an operator.

Outputs: `data/validate/<target>/`: `table.md` (the pass/fail table), `samples/<deliverable>.png` (targets
that run the files: references, then each level's outputs as the runtime computes them), the dense files
exported here when the chain is not dense; metrics in the contract's shape per deliverable (dense against
the most compressed level) with every level's row.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from condenser.compress.contract import compare
from condenser.compress.sparse.variants import CHAIN, export
from condenser.core.config import DENSE, MeasuredTarget, Params, VirtualTarget
from condenser.core.errors import ConfigError, StageError
from condenser.core.io import StagePaths, read_json
from condenser.core.plots import save_grid
from condenser.core.stage import Stage, stage_main
from condenser.deliverables import Deliverable, deliverable
from condenser.targets.budgets import budgets_for, check, check_quality_keys, quality_drop
from condenser.targets.devices import Level, estimate, latencies, parity, runner, sample_grid
from condenser.targets.graph import disallowed, load_graph, peak_memory

ORT, ET = "onnxruntime", "executorch"
FILES = {ORT: ("model.fp32.onnx", "model.int8.onnx"), ET: ("model.fp32.pte", "model.int8.pte")}
PREDICTOR_MODEL = "model"


def run(params: Params, paths: StagePaths, name: str) -> dict:
    target = params.targets[name]
    cfg = params.validate_
    ds = {n: deliverable(n, spec, paths) for n, spec in params.deliverables.items()}
    check_inputs(params, name, ds, paths)
    stage = Stage("validate", paths, {"target": name, "spec": target.model_dump(), **cfg.model_dump(),
                                      "deliverables": {n: s.model_dump() for n, s in params.deliverables.items()},
                                      "chain": dict(params.sparse.chain)}, seed=cfg.seed, item=name)
    for n in ds:
        stage.add_input(paths.data("quantize", n))
    measured = isinstance(target, MeasuredTarget)
    skipped = None
    if measured and target.kind == "cuda" and not torch.cuda.is_available():
        skipped = ("no CUDA device on this machine (torch.cuda.is_available() is False); validate@" + name +
                   " measures where one is")
    predictor = _predictor(paths, required=not measured and target.estimator == "predictor")
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        results, grids = {}, {}
        for n, d in ds.items():
            if skipped:
                results[n] = {"kind": d.kind.name, "levels": {lv: _skipped(skipped) for lv in target.levels}}
                continue
            levels, missing = build_levels(params, target, d, paths, scratch)
            results[n], grid = validate(params, name, d, levels, predictor)
            results[n]["levels"].update({lv: _skipped(why) for lv, why in missing.items()})
            if grid is not None:
                grids[n] = grid
        table = table_markdown(name, target, results, skipped)
        failures = [(n, lv, f) for n, r in results.items() for lv, row in r["levels"].items()
                    for f in row.get("failures", [])]
        if failures and target.gate == "fail":
            # Nothing is written: the flow run fails here and nothing after validate runs.
            raise StageError(f"target {name} (gate: fail): {len(failures)} budget(s) broken; change the model "
                             f"or targets.{name}.budgets in params.yaml\n" + table)
        with stage.output(artifact=f"validation of every deliverable on target '{name}' ({_describe(target)})",
                          target=name) as tmp:
            (tmp / "table.md").write_text(table)
            for n, (grid, ncol) in grids.items():
                save_grid(grid, tmp / "samples" / f"{n}.png", nrow=ncol, scale=4)
            for n in results:
                if (scratch / n).is_dir():
                    shutil.copytree(scratch / n, tmp / n)
    # Paths relative to the project (the files exported here live in the stage's output now): the metrics of
    # two checkouts of the same commit are the same file.
    root = paths.root.absolute()
    for r in results.values():
        for row in r["levels"].values():
            if row.get("file", "").startswith(str(scratch)):
                row["file"] = str(Path("data/validate") / name / Path(row["file"]).relative_to(scratch))
            elif row.get("file") and Path(row["file"]).is_relative_to(root):
                row["file"] = str(Path(row["file"]).relative_to(root))
    rows = [row for r in results.values() for row in r["levels"].values()]
    summary = {"checked": sum(row["status"] != "skipped" for row in rows),
               "passed": sum(row["status"] == "pass" for row in rows),
               "failed": sum(row["status"] == "fail" for row in rows),
               "skipped": sum(row["status"] == "skipped" for row in rows)}
    status = "skipped" if skipped else ("warn" if summary["failed"] else "pass")
    metrics = {"target": name, "kind": target.kind, "measured": measured,
               "estimator": None if measured else target.estimator, "gate": target.gate, "status": status,
               "skipped": skipped, "summary": summary, "deliverables": results}
    print(table)
    return stage.finish(metrics)


def check_inputs(params: Params, name: str, ds: dict[str, Deliverable], paths: StagePaths) -> None:
    """Everything a long run would trip on later, before it starts."""
    target = params.targets[name]
    for n, d in ds.items():
        budgets = budgets_for(target, n, d.kind.name)
        if budgets is not None:
            key = n if n in target.budgets else d.kind.name
            check_quality_keys(budgets, d.kind.quality, f"targets.{name}.budgets.{key}")
        for stage in ("sparse", "quantize"):
            if not paths.data(stage, n).is_dir() or not paths.metrics(stage, n).is_file():
                raise ConfigError(f"{paths.data(stage, n)}: missing; validate checks what {stage} made for "
                                  f"'{n}': run `dvc repro {stage}@{n}` first")


def _describe(target: MeasuredTarget | VirtualTarget) -> str:
    return f"measured on {target.kind}" if isinstance(target, MeasuredTarget) else f"estimated: {target.estimator}"


def _skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "failures": []}


def _predictor(paths: StagePaths, required: bool):
    folder = paths.data("predictor") / PREDICTOR_MODEL
    if not folder.is_dir():
        if required:
            raise ConfigError(f"{folder}: missing; this target's estimator is the predictor: run "
                              "`dvc repro predictor` first")
        return None
    from condenser.targets.predictor import Predictor

    return Predictor.load(folder)


def _quality(kind, block: dict) -> dict:
    return {k: block[k] for k in kind.quality if k in block}


def _profile(block: dict) -> dict:
    return {k: block[k] for k in ("params", "nonzero_params") if k in block}


def teacher_quality(params: Params, d: Deliverable, paths: StagePaths) -> dict:
    """The teacher's own figures for the metrics it has, from the stage that distilled the deliverable: the
    50-step guided teacher for the student (step_distill), the teacher's img2img edits for an editor (lora's
    held-out set). A deliverable made elsewhere has none: its drop budgets then fail as unmeasured."""
    parts = Path(params.deliverables[d.name].path).parts
    if d.kind.name == "sd_unet" and paths.metrics("step_distill").is_file() and parts[:2] == ("data", "step_distill"):
        models = read_json(paths.metrics("step_distill"))["models"]
        teacher = max((m for m in models.values() if m["model"] == "teacher"), key=lambda m: m["steps"])
        return _quality(d.kind, teacher)
    if d.kind.name == "gan_editor" and parts[:2] == ("data", "lora") and len(parts) > 2:
        file = paths.metrics("lora", parts[2])
        if file.is_file():
            return _quality(d.kind, read_json(file)["heldout"]["teacher"])
    return {}


def build_levels(params: Params, target, d: Deliverable, paths: StagePaths,
                 scratch: Path) -> tuple[list[Level], dict[str, str]]:
    """The levels of `d` that exist and this target validates, with their files; and the ones that cannot
    be validated here, with the reason."""
    kind, name = d.kind, d.name
    chain = params.sparse.chain[name]
    qdir = paths.data("quantize", name)
    qm, sm = read_json(paths.metrics("quantize", name)), read_json(paths.metrics("sparse", name))
    runtime = ET if target.kind == ET else ORT
    chain_model = kind.load(paths.data("sparse", name) / CHAIN)
    example = kind.example_inputs(d)
    levels, missing = [], {}

    def file(rt: str, precision: int) -> Path | None:
        path = qdir / rt / FILES[rt][precision]
        return path if path.is_file() else None

    if "dense" in target.levels:
        if chain == DENSE:
            onnx, pte = file(ORT, 0), file(ET, 0)
            model = chain_model
        else:
            model = kind.load(d.path)
            onnx = export(kind, model, example, scratch / name / "dense.onnx")
            pte = None
            if target.kind == ET:
                from condenser.runtime.executorch import export_pte

                pte = export_pte(kind.exportable(model), tuple(example.values()), scratch / name / "dense.pte")
        levels.append(Level("dense", DENSE, model, onnx, pte, _quality(kind, sm["dense"]), _profile(sm["dense"])))
    if "sparse" in target.levels and chain != DENSE:
        block = sm["variants"][chain]["compressed"]
        levels.append(Level("sparse", chain, chain_model, file(ORT, 0), file(ET, 0), _quality(kind, block),
                            _profile(block)))
    if "int8" in target.levels:
        if target.kind == "cuda":
            missing["int8"] = "no int8 runtime for CUDA here (ONNX Runtime has only its CPU provider)"
        elif runtime not in qm.get("deployed", {}):
            missing["int8"] = (f"quantize did not deploy '{name}' on {runtime}: add it to quantize.runtimes")
        else:
            block = qm["deployed"][runtime]["compressed"]
            levels.append(Level("int8", qm["deploy"], chain_model, file(ORT, 1), file(ET, 1), _quality(kind, block),
                                _profile(block)))
    # A level needs the file its target reads: the .pte for mobile, the ONNX graph for the rest.
    usable = []
    for lv in levels:
        needed = lv.pte if target.kind == ET else lv.onnx
        if needed is None:
            missing[lv.name] = (f"no {'ExecuTorch .pte' if target.kind == ET else 'ONNX'} file for this level in "
                                f"{qdir}: add {runtime} to quantize.runtimes")
        else:
            usable.append(lv)
    return usable, missing


def validate(params: Params, name: str, d: Deliverable, levels: list[Level],
             predictor) -> tuple[dict, tuple[torch.Tensor, int] | None]:
    """Every level of one deliverable on target `name`: rows with the budgets checked, the contract block
    (dense against the most compressed level), and the sample grid where the target runs the files."""
    target, cfg, kind = params.targets[name], params.validate_, d.kind
    measured = isinstance(target, MeasuredTarget)
    example = kind.example_inputs(d)
    teacher = teacher_quality(params, d, d.paths)
    budgets = budgets_for(target, d.name, kind.name)
    rows, grid, timings, runs = {}, None, {}, {}
    if measured and levels:
        timings = latencies(target, levels, example, kind.exportable)
        inputs = next(iter(kind.calibration_batches(d, cfg.parity_examples, cfg.parity_examples, cfg.seed)))
        runs = {lv.name: runner(target, lv, list(example), kind.exportable(lv.model)) for lv in levels}
    for lv in levels:
        graph = load_graph(lv.onnx) if lv.onnx is not None else None
        deployed = lv.pte if target.kind == ET else lv.onnx
        row = {"variant": lv.variant, "file": str(deployed), "status": "pass", "reason": None,
               "quality": lv.quality, "teacher_quality": teacher,
               "quality_drop": quality_drop(lv.quality, teacher, kind.quality),
               "size_bytes": deployed.stat().st_size, **lv.profile,
               "peak_memory_bytes": peak_memory(graph).peak_bytes if graph is not None else None,
               "peak_memory_planner_bytes": _planner(lv.pte),
               "operators": dict(sorted(graph.operators().items())) if graph is not None else {},
               "macs": graph.macs if graph is not None else None}
        if measured:
            t = timings[lv.name]
            row["latency_ms"] = {"median": t.median_ms, "p95": t.p95_ms}
            row["parity"] = parity(runs[lv.name], kind.exportable(lv.model), _forward, inputs)
            if predictor is not None and graph is not None and target.kind in (ORT, ET):
                row["predicted"] = predictor.estimates(graph, "cpu" if target.kind == ORT else "mobile")
        else:
            ms, how = estimate(target, graph, lv, kind.exportable(lv.model), example, predictor)
            row["latency_ms"] = {"median": ms, "p95": ms}
            row["estimate"] = how
        bad = (disallowed(graph, target.operators, getattr(target, "int8_only", False))
               if graph is not None and (target.operators is not None or getattr(target, "int8_only", False))
               else [])
        failures = check(row, budgets, kind.quality, bad)
        row["failures"] = [f.to_dict() for f in failures]
        row["status"] = "fail" if failures else "pass"
        rows[lv.name] = row
    if measured and levels and target.kind != "cuda":
        grid = sample_grid(d, levels, runs, cfg.samples)
    result = {"kind": kind.name, "levels": rows}
    if len(levels) > 1:
        result.update(compare(_block(rows[levels[0].name], name), _block(rows[levels[-1].name], name)))
    return result, grid


def _forward(model, inputs: dict) -> torch.Tensor:
    return model(*inputs.values())


def _planner(pte: Path | None) -> int | None:
    if pte is None:
        return None
    from condenser.runtime.executorch import arena_bytes

    return arena_bytes(pte)


def _block(row: dict, target: str) -> dict:
    """A level's row in the compression metrics contract's shape (latency keyed by the target's name)."""
    return {**row["quality"], "params": row.get("params"), "nonzero_params": row.get("nonzero_params"),
            "size_bytes": row["size_bytes"], "macs": row["macs"],
            "peak_memory_bytes": row["peak_memory_bytes"],
            "latency_ms": {target: dict(row["latency_ms"])}}


def table_markdown(name: str, target, results: dict, skipped: str | None) -> str:
    """The pass/fail table a person reads: one row per deliverable and level, the reasons spelled out."""
    lines = [f"# validate@{name}: {_describe(target)}, gate {target.gate}", ""]
    if skipped:
        lines += [f"**skipped**: {skipped}", ""]
    lines += ["| deliverable | level | variant | status | latency p50 / p95 (ms) | size (B) | peak memory (B) | "
              "failures |", "|---|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        for lv, row in r["levels"].items():
            lat = row.get("latency_ms")
            latency = f"{lat['median']:.4g} / {lat['p95']:.4g}" if lat else ""
            why = "; ".join(f["message"] for f in row.get("failures", [])) or (row.get("reason") or "")
            lines.append(f"| {n} | {lv} | {row.get('variant', '')} | {row['status']} | {latency} | "
                         f"{row.get('size_bytes', '') or ''} | {row.get('peak_memory_bytes', '') or ''} | {why} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    stage_main("validate", run, items="targets", whole=True)


if __name__ == "__main__":
    main()
