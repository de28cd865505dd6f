"""sparse@<deliverable> — sparse training and filter pruning, measured beside the dense model.

Methods (`sparse.methods`, each a `kind`; see condenser.compress.sparse.methods): prune & fine-tune
(gradual magnitude pruning, optionally against the lottery ticket at the same steps), MEST
(prune-and-grow sparse training, optionally against itself without dropping examples), filter (channels
physically removed with torch-pruning) and HASS (per-layer sparsity searched against a dataflow
accelerator's throughput, against uniform). Every method fine-tunes with the deliverable kind's loss
against the dense model on the deliverable's own inputs. Per-layer sensitivity is measured once.

Every variant is reported in the compression metrics contract (condenser.compress.contract): the dense
model as `reference`, the variant as `compressed` — the kind's quality metrics, params, non-zero params,
MACs (and non-zero MACs, what a sparse accelerator executes), the bytes of the file that ships (values
+ bitmask for unstructured sparsity, the smaller model for filter pruning), ONNX Runtime CPU latency at
batch 1 — and their ratios.

Run per deliverable, as DVC's foreach does: `python -m tasks.sparse student`.
Outputs: data/sparse/<deliverable>/{<variant>/ (unstructured: weights.sparse.safetensors; filter: the
deliverable's own format, smaller, + model.onnx), chain/ (the variant `sparse.chain` names, in the
deliverable's own format: what quantize loads), sensitivity.json, manifest.json};
metrics/sparse/<deliverable>.json; plots/sparse/<deliverable>.tsv (per-layer sensitivity and sparsity).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from accelerate.utils import set_seed

from condenser.compress.contract import compare
from condenser.compress.sparse.masks import layer_sparsity, weight_sparsity
from condenser.compress.sparse.methods import METHODS, Context, Variant
from condenser.compress.sparse.train import Examples
from condenser.compress.sparse.variants import CHAIN, ONNX_FILE, SPARSE_FILE, measure, save_variant
from condenser.core.config import DENSE, Params
from condenser.core.errors import ConfigError
from condenser.core.io import StagePaths, write_json
from condenser.core.stage import Stage, stage_main
from condenser.deliverables import Deliverable, deliverable

__all__ = ["CHAIN", "ONNX_FILE", "SPARSE_FILE", "run"]


def methods_for(params: Params, name: str) -> dict:
    """The sparse.methods entries that run on deliverable `name`, in params order."""
    return {m: cfg for m, cfg in params.sparse.methods.items() if cfg.deliverables is None or name in cfg.deliverables}


def check(params: Params, d: Deliverable) -> None:
    """Everything that would fail late, checked before any work."""
    for folder, key in ((d.path, "path"), (d.data, "data")):
        if not folder.exists():
            raise ConfigError(f"deliverables.{d.name}.{key}: {folder} does not exist; run the stage that makes it "
                              "(dvc repro) or fix the path")


def run(params: Params, paths: StagePaths, name: str) -> dict:
    cfg = params.sparse
    d = deliverable(name, params.deliverables[name], paths)
    check(params, d)
    kind = d.kind
    chosen = cfg.chain[name]
    stage = Stage("sparse", paths, {"deliverable": name, "spec": params.deliverables[name].model_dump(),
                                    **cfg.model_dump(), "init_seed": params.gan_base.seed},
                  seed=cfg.seed, item=name)
    for p in (d.path, d.data, paths.data("evaluator")):
        stage.add_input(p)

    set_seed(cfg.seed)
    dense = kind.load(d.path)
    example = kind.example_inputs(d)
    examples = Examples(kind.calibration_batches(d, cfg.calibration, cfg.batch_size, cfg.seed))
    ctx = Context(deliverable=d, dense=dense, examples=examples, example=example, cfg=cfg,
                  init_seed=params.gan_base.seed)

    variants: list[Variant] = []
    for method, method_cfg in methods_for(params, name).items():
        set_seed(cfg.seed)
        variants.extend(METHODS[method_cfg.kind](method, method_cfg, ctx))

    with tempfile.TemporaryDirectory() as scratch:
        models = {DENSE: (dense, True), **{v.name: (v.model, v.structured) for v in variants}}
        sides = measure(kind, d, models, example, Path(scratch), cfg.latency_repeats, cfg.latency_threads)
    reference = sides[DENSE]
    results = {}
    for v in variants:
        contract = compare(reference, sides[v.name])
        clash = set(contract) & set(v.details)
        if clash:
            raise ValueError(f"{v.name}: details {sorted(clash)} clash with the metrics contract's keys")
        results[v.name] = {"method": v.method, **v.details, **contract,
                           "layer_sparsity": layer_sparsity(v.model), "weight_sparsity": weight_sparsity(v.model)}

    by_name = {v.name: v for v in variants}
    chain_model = dense if chosen == DENSE else by_name[chosen].model
    sensitivity = ctx.sensitivity
    with stage.output(artifact=f"sparse variants of deliverable '{name}' ({kind.name}); chain: {chosen}",
                      chain=chosen, variants=sorted(by_name)) as tmp:
        for v in variants:
            save_variant(kind, v, tmp / v.name, d.path, example)
        kind.save(chain_model, tmp / CHAIN, source=d.path)
        write_json(tmp / "sensitivity.json", sensitivity.to_dict())
    _write_table(stage.plots / f"{name}.tsv", sensitivity, results)

    metrics = {"deliverable": name, "kind": kind.name, "chain": chosen, "examples": len(examples),
               "dense": reference, "variants": results,
               "most_sensitive": [{"layer": n, "error": e}
                                  for n, e in sensitivity.ranked(max(sensitivity.levels))[:10]]}
    return stage.finish(metrics)


def _write_table(path: Path, sensitivity, results: dict) -> None:
    """Per layer: error at each sensitivity level, and each unstructured variant's achieved sparsity."""
    variants = [v for v, r in results.items() if r["method"] != "filter"]
    header = ["layer", *[f"error@{lv}" for lv in sensitivity.levels], *[f"sparsity:{v}" for v in variants]]
    lines = ["\t".join(header)]
    for layer, errs in sensitivity.errors.items():
        row = [layer, *[f"{errs[lv]:.6g}" for lv in sensitivity.levels],
               *[f"{results[v]['layer_sparsity'].get(layer, 0.0):.4f}" for v in variants]]
        lines.append("\t".join(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    stage_main("sparse", run, items="deliverables", whole=True)


if __name__ == "__main__":
    main()
