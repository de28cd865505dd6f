"""Targets benchmark: measured against estimated latency for every deliverable and level on the measured
targets, and every target's gate.

For each measured target validate ran (cpu: ONNX Runtime, mobile: ExecuTorch/XNNPACK), the files validate
checked are timed again here, side by side per deliverable on an idle machine (batch 1, one thread), and set
beside three estimates from the same ONNX graph: the learned predictor (PerfSAGE, data/predictor/model), the
op-count model (MicroNets: latency linear in op count, fitted on the predictor's training rows of that
target) and a per-operator roofline of this CPU (nominal peaks, below). MAPE per estimator and target; then
each target's gate (status, rows passed/failed/skipped, the failures' messages) from metrics/validate.

    python bench/targets.py [--repeats 300] [--out bench/results/targets.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condenser.core.config import MeasuredTarget, load_params  # noqa: E402
from condenser.core.io import StagePaths, read_json  # noqa: E402
from condenser.deliverables import deliverable  # noqa: E402
from condenser.targets.estimate import Roofline, opcount_latency, roofline_latency  # noqa: E402
from condenser.targets.graph import load_graph  # noqa: E402
from condenser.targets.predictor import Predictor  # noqa: E402

# This machine's core as a roofline (AMD EPYC, AVX-512 VNNI, one thread): nominal peaks, not measured ones;
# the per-operator overhead is ONNX Runtime's dispatch cost for a small operator, about 5 us here.
CPU_ROOFLINE = Roofline(int8_ops_per_s=400e9, float_ops_per_s=100e9, bytes_per_s=20e9, op_overhead_us=5.0)
# The predictor's name for each measured runtime.
PREDICTED = {"onnxruntime": "cpu", "executorch": "mobile"}


def retime(kind: str, files: dict[str, Path], example: dict, repeats: int) -> dict[str, float]:
    """Median ms of each file, timed side by side on one thread."""
    if kind == "onnxruntime":
        from condenser.runtime.measure import compare_latency

        timings = compare_latency(files, {k: v.numpy() for k, v in example.items()}, repeats, threads=1)
    else:
        from condenser.runtime.executorch import compare_pte_latency

        timings = compare_pte_latency(files, tuple(example.values()), repeats, threads=1)
    return {name: t.median_ms for name, t in timings.items()}


def mape(rows: list[dict], key: str) -> float | None:
    errors = [abs(r[key] - r["measured_ms"]) / r["measured_ms"] for r in rows if r.get(key) is not None]
    return float(np.mean(errors)) if errors else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "targets.json")
    args = parser.parse_args()
    paths = StagePaths(ROOT)
    params = load_params(ROOT / "params.yaml")
    predictor = Predictor.load(paths.data("predictor") / "model")
    rows, gates = [], {}
    for name, target in params.targets.items():
        file = paths.metrics("validate", name)
        if not file.is_file():
            gates[name] = {"status": "not run"}
            continue
        m = read_json(file)
        gates[name] = {"status": m["status"], "gate": m["gate"], "measured": m["measured"],
                       "estimator": m["estimator"], "skipped": m["skipped"], **m["summary"],
                       "failures": [f"{d}/{lv}: {f['message']}" for d, r in m["deliverables"].items()
                                    for lv, row in r["levels"].items() for f in row.get("failures", [])]}
        if not isinstance(target, MeasuredTarget) or target.kind not in PREDICTED or m["skipped"]:
            continue
        which = PREDICTED[target.kind]
        for dname, r in m["deliverables"].items():
            levels = {lv: row for lv, row in r["levels"].items() if row["status"] != "skipped"}
            if not levels:
                continue
            d = deliverable(dname, params.deliverables[dname], paths)
            example = d.kind.example_inputs(d)
            measured = retime(target.kind, {lv: ROOT / row["file"] for lv, row in levels.items()}, example,
                              args.repeats)
            for lv, row in levels.items():
                onnx = ROOT / row["file"] if row["file"].endswith(".onnx") else _onnx_of(ROOT / row["file"])
                graph = load_graph(onnx)
                slope, intercept = predictor.opcount[which]
                rows.append({"target": name, "deliverable": dname, "level": lv, "measured_ms": measured[lv],
                             "validate_ms": row["latency_ms"]["median"],
                             "predictor_ms": predictor.predict(graph)[which]["latency_ms"],
                             "opcount_ms": opcount_latency(graph, slope, intercept),
                             "roofline_ms": roofline_latency(graph, CPU_ROOFLINE)[0] if which == "cpu" else None})
    summary = {}
    for name in {r["target"] for r in rows}:
        mine = [r for r in rows if r["target"] == name]
        summary[name] = {k: mape(mine, f"{k}_ms") for k in ("predictor", "opcount", "roofline")}
    _print(rows, summary, gates)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "rows": rows, "mape": summary, "gates": gates,
                                    "cpu_roofline": vars(CPU_ROOFLINE)}, indent=2))
    print(f"wrote {args.out}")


def _onnx_of(pte: Path) -> Path:
    """The ONNX file of the same model as a .pte validate ran: quantize ships both side by side; validate
    exports both for a dense level it made itself."""
    if pte.parent.name == "executorch":
        return pte.parent.parent / "onnxruntime" / pte.name.replace(".pte", ".onnx")
    return pte.with_suffix(".onnx")


def _print(rows: list[dict], summary: dict, gates: dict) -> None:
    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"{'target':8} {'deliverable':20} {'level':7} {'measured':>9} {'validate':>9} {'predictor':>9} "
          f"{'opcount':>9} {'roofline':>9}")
    for r in rows:
        print(f"{r['target']:8} {r['deliverable']:20} {r['level']:7} {ms(r['measured_ms']):>9} "
              f"{ms(r['validate_ms']):>9} {ms(r['predictor_ms']):>9} {ms(r['opcount_ms']):>9} "
              f"{ms(r['roofline_ms']):>9}")
    print("\nMAPE against the latency measured here")
    for name, s in summary.items():
        print(f"  {name:8} " + "  ".join(f"{k} {'-' if v is None else f'{v:.1%}'}" for k, v in s.items()))
    print("\ngates")
    for name, g in gates.items():
        line = f"  {name:9} {g['status']:8}"
        if "checked" in g:
            line += f" gate {g['gate']}: {g['passed']} passed, {g['failed']} failed, {g['skipped']} skipped"
        if g.get("skipped"):
            line += f" ({g['skipped']})"
        print(line)
        for f in g.get("failures", [])[:8]:
            print(f"      {f}")


if __name__ == "__main__":
    main()
