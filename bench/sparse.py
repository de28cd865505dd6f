"""Sparse benchmark: every sparse variant the `sparse` stage shipped, re-measured from its files beside
the dense deliverable in one run on this machine.

For each deliverable with a `data/sparse/<name>` output, the dense model and every variant are loaded
from the files that ship (unstructured: values + bitmask restored into the deliverable's architecture;
filter: the smaller model) and measured the same way: the kind's quality metrics on held-out data,
params, non-zero params, MACs, non-zero MACs, file bytes, ONNX Runtime CPU latency at batch 1 (median,
p95), and ratios to dense. The training-side comparisons come from the stage's metrics: prune &
fine-tune against the lottery ticket at the same steps, MEST dropping never-forgotten examples against
MEST keeping them (examples dropped, training time), HASS's modelled throughput against uniform.

    python bench/sparse.py [--deliverables student editor_bold] [--repeats 500] [--out bench/results/sparse.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condenser.compress.contract import compare  # noqa: E402
from condenser.compress.sparse.masks import weight_sparsity  # noqa: E402
from condenser.compress.sparse.variants import load_variant, measure  # noqa: E402
from condenser.core.config import load_params  # noqa: E402
from condenser.core.io import StagePaths, read_json  # noqa: E402
from condenser.deliverables import deliverable  # noqa: E402

GOALS = {"unstructured_size_ratio": 1 / 5, "filter_speedup_editor": 1.7, "hass_speedup": 1.3,
         "mest_time_saved": 0.2}


def bench(name: str, paths: StagePaths, repeats: int) -> dict:
    params = load_params(paths.root / "params.yaml")
    d = deliverable(name, params.deliverables[name], paths)
    kind = d.kind
    folder = paths.data("sparse", name)
    manifest = read_json(folder / "manifest.json")
    stage_metrics = read_json(paths.metrics("sparse", name))
    dense = kind.load(d.path)
    example = kind.example_inputs(d)
    models = {"dense": (dense, True)}
    for variant in manifest["variants"]:
        structured = stage_metrics["variants"][variant]["method"] == "filter"
        models[variant] = (load_variant(kind, folder / variant, d.path), structured)
    with tempfile.TemporaryDirectory() as scratch:
        sides = measure(kind, d, models, example, Path(scratch), repeats, params.sparse.latency_threads)
    reference = sides["dense"]
    rows = {variant: {"method": stage_metrics["variants"][variant]["method"],
                      "weight_sparsity": weight_sparsity(models[variant][0]), **compare(reference, sides[variant])}
            for variant in manifest["variants"]}
    return {"deliverable": name, "kind": kind.name, "chain": manifest["chain"], "dense": reference,
            "variants": rows, "studies": studies(stage_metrics["variants"])}


def studies(variants: dict) -> dict:
    """The seed's comparisons, from the stage's training records."""
    out = {}
    for name, v in variants.items():
        if f"{name}.lottery" in variants:
            lt = variants[f"{name}.lottery"]
            out[f"{name} vs lottery"] = {"prune_finetune": v["compressed"], "lottery": lt["compressed"],
                                         "steps": v["train"]["steps"], "lottery_steps": lt["train"]["steps"],
                                         "init_final_correlation": lt["init_final_correlation"]}
        if f"{name}.keep_all" in variants:
            keep = variants[f"{name}.keep_all"]
            out[f"{name} dropping vs keeping"] = {
                "dropped_examples": v["train"]["dropped_examples"], "examples": v["examples"],
                "steps": v["train"]["steps"], "keep_all_steps": keep["train"]["steps"],
                "wall_time_s": v["train"]["wall_time_s"], "keep_all_wall_time_s": keep["train"]["wall_time_s"],
                "time_saved": v.get("time_saved"), "dropping": v["compressed"], "keep_all": keep["compressed"]}
        if "search" in v:
            s = v["search"]
            out[f"{name} vs uniform"] = {"throughput": s["searched"]["schedule"]["throughput"],
                                         "uniform_throughput": s["uniform"]["schedule"]["throughput"],
                                         "estimated_error": s["searched"]["error"],
                                         "uniform_estimated_error": s["uniform"]["error"],
                                         "modelled_speedup": s["speedup"],
                                         "hass": v["compressed"],
                                         "uniform": variants.get(f"{name}.uniform", {}).get("compressed")}
    return out


def _quality(block: dict) -> str:
    out = []
    for k, v in block.items():
        if k in ("params", "nonzero_params", "macs", "nonzero_macs", "size_bytes", "latency_ms"):
            continue
        if isinstance(v, dict):
            out += [f"{k}.{h}={x:.3f}" for h, x in v.items()]
        else:
            out.append(f"{k}={v:.3f}")
    return " ".join(out)


def print_table(result: dict) -> None:
    print(f"\n== {result['deliverable']} ({result['kind']}), chain: {result['chain']}")
    head = (f"{'variant':<18}{'sparsity':>9}{'params':>10}{'nonzero':>10}{'MACs':>11}{'nz MACs':>11}{'bytes':>10}"
            f"{'ORT ms':>8}{'p95':>7}{'x bytes':>8}{'x ORT':>7}  quality")
    print(head)
    d = result["dense"]
    ort = d["latency_ms"]["onnxruntime"]
    print(f"{'dense':<18}{0:>9.3f}{d['params']:>10}{d['nonzero_params']:>10}{d['macs']:>11}{d['nonzero_macs']:>11}"
          f"{d['size_bytes']:>10}{ort['median']:>8.3f}{ort['p95']:>7.3f}{1:>8.2f}{1:>7.2f}  {_quality(d)}")
    for name, r in result["variants"].items():
        c, ratio = r["compressed"], r["ratio"]
        ort = c["latency_ms"]["onnxruntime"]
        print(f"{name:<18}{r['weight_sparsity']:>9.3f}{c['params']:>10}{c['nonzero_params']:>10}{c['macs']:>11}"
              f"{c['nonzero_macs']:>11}{c['size_bytes']:>10}{ort['median']:>8.3f}{ort['p95']:>7.3f}"
              f"{1 / ratio['size_bytes']:>8.2f}{1 / ratio['latency_ms']['onnxruntime']['median']:>7.2f}  {_quality(c)}")
    for study, s in result["studies"].items():
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if not isinstance(v, dict)}
        print(f"  {study}: {shown}")
        for k, v in s.items():
            if isinstance(v, dict):
                print(f"    {k}: {_quality(v)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliverables", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sparse.json")
    args = parser.parse_args()
    paths = StagePaths(ROOT)
    names = args.deliverables or sorted(p.name for p in paths.data("sparse").iterdir() if p.is_dir())
    results = [bench(name, paths, args.repeats) for name in names]
    for result in results:
        print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"goals": GOALS, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
