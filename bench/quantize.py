"""Quantization benchmark: every scheme the `quantize` stage simulated, and its int8 files re-timed on both
runtimes beside their fp32 files in one run on this machine.

For each deliverable with a `data/quantize/<name>` output: one row per simulated scheme (bits, group size,
calibration: every sampler step or one, Winograd tile), with its output SQNR against fp32, the kind's quality
metrics and stored size, from the stage's metrics (the quality of a simulation is computed once, by the stage);
and one row per runtime, where the fp32 and int8 files the stage shipped are timed again side by side at
batch 1 (median, p95, int8/fp32 ratio), with their file sizes and the stage's deployed-vs-simulated error and
the quality computed from the runtime's own outputs. Winograd rows are simulated: no runtime here executes
Winograd-domain int8.

    python bench/quantize.py [--deliverables student editor_bold] [--repeats 300] [--out bench/results/quantize.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condenser.core.config import load_params  # noqa: E402
from condenser.core.io import StagePaths, read_json  # noqa: E402
from condenser.deliverables import deliverable  # noqa: E402
from condenser.runtime.measure import compare_latency  # noqa: E402
from tasks.quantize import FILES, ORT  # noqa: E402


def headline(kind: str, quality: dict) -> dict:
    """The figures a row shows: FD and digit accuracy (student), PSNR and concept accuracy (editor)."""
    if kind == "sd_unet":
        return {"fd": quality["fd"], "digit_accuracy": quality["prompt_accuracy"]["digit"]}
    return {"psnr": quality["psnr"], "concept_accuracy": quality["concept_accuracy"]}


def bench(name: str, paths: StagePaths, repeats: int) -> dict:
    params = load_params(paths.root / "params.yaml")
    d = deliverable(name, params.deliverables[name], paths)
    kind = d.kind
    m = read_json(paths.metrics("quantize", name))
    folder = paths.data("quantize", name)
    schemes = params.quantize.schemes
    rows = [{"variant": "fp32", "bits": "w32a32", "group": "-", "calibration": "-", "tile": "-", "sqnr_db": None,
             **headline(kind.name, m["fp32"]), "size_bytes": m["schemes"][m["deploy"]]["reference"]["size_bytes"]}]
    for s, r in m["schemes"].items():
        sc = schemes[s]
        rows.append({"variant": s, "bits": f"w{sc.weight_bits}a{sc.activation_bits}", "group": sc.group_size or "ch",
                     "calibration": "all steps" if "timestep" in m else "-", "tile": "-", "sqnr_db": r["sqnr_db"],
                     **headline(kind.name, r["compressed"]), "size_bytes": r["compressed"]["size_bytes"],
                     "kept": len(r["kept"])})
    for s, r in m.get("timestep", {}).items():
        sc = schemes[s]
        rows.append({"variant": f"{s} (one step)", "bits": f"w{sc.weight_bits}a{sc.activation_bits}",
                     "group": sc.group_size or "ch", "calibration": f"step {params.quantize.timestep.step}",
                     "tile": "-", "sqnr_db": r["sqnr_db"], **headline(kind.name, r["quality"]), "size_bytes": None})
    w = m.get("winograd")
    if w:
        for tile, r in w.items():
            if not tile.startswith("f"):
                continue
            for state in ("untuned", "tuned"):
                rows.append({"variant": f"winograd {tile} {state}", "bits": "w8a8 (simulated)",
                             "group": params.quantize.winograd.group_size or "tap", "calibration": "-",
                             "tile": f"F({tile[1:]},3)", "sqnr_db": r[state]["sqnr_db"],
                             **headline(kind.name, r[state]["quality"]), "size_bytes": None})
    example = kind.example_inputs(d)
    runtimes = {}
    for rt in m["deployed"]:
        files = {p: folder / rt / f for p, f in zip(("fp32", "int8"), FILES[rt])}
        if rt == ORT:
            timings = compare_latency(files, {k: v.numpy() for k, v in example.items()}, repeats,
                                      threads=params.quantize.latency_threads)
        else:
            from condenser.runtime.executorch import compare_pte_latency

            timings = compare_pte_latency(files, tuple(example.values()), repeats,
                                          threads=params.quantize.latency_threads)
        stage = m["deployed"][rt]
        runtimes[rt] = {"fp32_ms": timings["fp32"].to_dict(), "int8_ms": timings["int8"].to_dict(),
                        "int8_over_fp32": timings["int8"].median_ms / timings["fp32"].median_ms,
                        "fp32_bytes": files["fp32"].stat().st_size, "int8_bytes": files["int8"].stat().st_size,
                        "parity_vs_simulated": stage["parity"], "deployed": headline(kind.name, stage["compressed"]),
                        "float_ops": stage.get("float_ops", {}).get("float_ops")}
        runtimes[rt]["size_ratio"] = runtimes[rt]["fp32_bytes"] / runtimes[rt]["int8_bytes"]
    return {"deliverable": name, "kind": kind.name, "chain": m["chain"], "rows": rows, "runtimes": runtimes,
            "goals": m["goals"]}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        keys = [k for k in r["rows"][0] if k not in ("variant",)]
        lines.append(f"\n{r['deliverable']} ({r['kind']}, chain: {r['chain']}) — simulated schemes")
        lines.append(" | ".join(["variant", *keys, "kept"]))
        for row in r["rows"]:
            lines.append(" | ".join([row["variant"], *(_fmt(row.get(k)) for k in keys), _fmt(row.get("kept"))]))
        lines.append(f"{r['deliverable']} — deployed (batch 1, 1 thread, timed side by side)")
        lines.append("runtime | fp32 ms (p95) | int8 ms (p95) | int8/fp32 | fp32 KB | int8 KB | smaller | "
                     "max/mean |deployed - simulated| | deployed quality")
        for rt, x in r["runtimes"].items():
            lines.append(" | ".join([rt, f"{x['fp32_ms']['median_ms']:.3f} ({x['fp32_ms']['p95_ms']:.3f})",
                                     f"{x['int8_ms']['median_ms']:.3f} ({x['int8_ms']['p95_ms']:.3f})",
                                     f"{x['int8_over_fp32']:.2f}", f"{x['fp32_bytes'] / 1024:.0f}",
                                     f"{x['int8_bytes'] / 1024:.0f}", f"{x['size_ratio']:.2f}x",
                                     f"{x['parity_vs_simulated']['max_abs']:.3g} / "
                                     f"{x['parity_vs_simulated']['mean_abs']:.3g}",
                                     ", ".join(f"{k} {_fmt(v)}" for k, v in x["deployed"].items())]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliverables", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize.json")
    args = parser.parse_args()
    paths = StagePaths(ROOT)
    params = load_params(ROOT / "params.yaml")
    names = args.deliverables or [n for n in params.deliverables if paths.data("quantize", n).is_dir()]
    if not names:
        sys.exit("no data/quantize/<deliverable> output: run `dvc repro quantize` (or make pipeline) first")
    results = [bench(n, paths, args.repeats) for n in names]
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
