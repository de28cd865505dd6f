"""predictor — the learned performance predictor (PerfSAGE) and the measured dataset it learns from, grown every run.

The population (`predictor.variants` variants of the editor and UNet families: widths, depths, blocks, attention,
input sizes, filter-pruning ratios, fp32 or int8; condenser.targets.population) is fixed by `predictor.seed`. Each
run measures the next `predictor.batch` variants not yet in the dataset on `cpu` (ONNX Runtime, `threads` threads,
`repeats` calls) and the first `predictor.mobile_batch` editors among them on `mobile` too (ExecuTorch/XNNPACK:
lowering a UNet takes one to several minutes, an editor seconds), appends them to the dataset, and retrains the
predictor on every row measured on this machine (same CPU, same thread count; latency means nothing elsewhere:
rows from other machines stay in the dataset but out of training). Variants held out by a seeded hash of their id
test the predictor against a constant and MicroNets' op-count model fitted on the same training rows.

The output is persistent (DVC `persist: true`): the next run starts from the dataset this one wrote.
Outputs: data/predictor/{dataset.jsonl (one measured variant per line: config, graph as per-node features and
edges, latency and peak memory per target, machine), model/ (predictor.safetensors + predictor.json),
manifest.json}; metrics/predictor.json (dataset size, held-out MAPE table, goal, time spent); plots/predictor.tsv
(held-out rows: measured, predicted and op-count latency per target).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed

from condenser.core.config import PredictorParams
from condenser.core.environment import cpu_model
from condenser.core.errors import ConfigError, DataError
from condenser.core.io import StagePaths
from condenser.core.stage import Stage, stage_main
from condenser.targets.population import (
    DEFAULT_SPACE,
    EDITOR,
    FAMILIES,
    TARGETS,
    Space,
    measure_many,
    sample_population,
)
from condenser.targets.predictor import Evaluation, load_dataset, save_dataset, train

DATASET, MODEL = "dataset.jsonl", "model"
# Families measured on `mobile`: lowering an editor to XNNPACK takes 4-20 s here, the smallest UNet of the
# population about a minute (the teacher's two minutes and more), too long for a run's budget.
MOBILE_FAMILIES = (EDITOR,)
# Measuring workers (one per core here), used from this many files on: each spawned worker first imports the
# model stack (about 8 s), more than a few small files take in this process.
WORKERS, PARALLEL_FROM = 2, 16
# The goal: held-out `cpu` latency MAPE at most this, and below the op-count model's.
GOAL_MAPE = 10.0


def check(cfg: PredictorParams) -> None:
    if cfg.mobile_batch > cfg.batch:
        raise ConfigError(f"predictor.mobile_batch ({cfg.mobile_batch}) is more than predictor.batch ({cfg.batch}): "
                          "mobile rows are chosen among the variants a run measures; lower mobile_batch")


def _goal(table: dict) -> dict:
    cpu = table.get("cpu", {}).get("latency")
    if not cpu:
        return {"max_mape": GOAL_MAPE, "reached": False, "why": "no held-out cpu rows yet"}
    mape, opcount = cpu["predictor"]["mape"], cpu.get("opcount", {}).get("mape")
    reached = mape <= GOAL_MAPE and (opcount is None or mape < opcount)
    return {"max_mape": GOAL_MAPE, "reached": reached, "predictor_mape": mape, "opcount_mape": opcount}


def _write_plot(path: Path, evaluations: list[Evaluation]) -> None:
    """Held-out rows: measured and predicted latency, and the op-count model's, per target."""
    lines = ["\t".join(("id", "family", "target", "measured_ms", "predicted_ms", "opcount_ms"))]
    for e in evaluations:
        opcount = "" if e.opcount_latency_ms is None else f"{e.opcount_latency_ms:.6g}"
        lines.append("\t".join((e.id, e.family, e.target, f"{e.latency_ms:.6g}", f"{e.predicted_latency_ms:.6g}",
                                opcount)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run(cfg: PredictorParams, paths: StagePaths, space: Space = DEFAULT_SPACE) -> dict:
    """Measure the next batch of the population, append it to the dataset, retrain and evaluate (see the module's
    docstring). `space` is the population's space (tests make it tiny)."""
    check(cfg)
    set_seed(cfg.seed)
    stage = Stage("predictor", paths, cfg.model_dump(), seed=cfg.seed)
    dataset = stage.output_dir / DATASET
    existing = load_dataset(dataset) if dataset.is_file() else []
    try:
        population = sample_population(cfg.seed, cfg.variants, space)
    except ValueError as error:
        raise ConfigError(f"predictor.variants: {error}") from error
    done = {r.id for r in existing}
    todo = [v for v in population if v.id not in done][:cfg.batch]
    mobile = [v.id for v in todo if v.family in MOBILE_FAMILIES][:cfg.mobile_batch]
    with tempfile.TemporaryDirectory(prefix="condenser-predictor-") as work:
        workers = WORKERS if len(todo) + len(mobile) >= PARALLEL_FROM else 0
        new, times = measure_many(todo, Path(work), mobile=mobile, repeats=cfg.repeats, threads=cfg.threads,
                                  workers=workers)
    rows = existing + new
    here = cpu_model()
    usable = [r for r in rows if r.machine == here and r.threads == cfg.threads]
    if not usable:
        raise DataError(f"{dataset}: none of its {len(rows)} rows was measured on this machine ({here}) with "
                        f"predictor.threads={cfg.threads}; raise predictor.batch to measure some here")
    started = time.perf_counter()
    predictor, report = train(usable, cfg)
    training_s = time.perf_counter() - started
    with stage.output(artifact="performance predictor (GraphSAGE over ONNX graphs) and its measured dataset") as tmp:
        save_dataset(rows, tmp / DATASET)
        predictor.save(tmp / MODEL)
    _write_plot(paths.root / "plots" / "predictor.tsv", report["evaluations"])
    noise = [r.targets["cpu"]["latency_ms"]["noise"] for r in new]
    metrics = {
        "dataset": {
            "rows": len(rows), "new": len(new), "population": len(population),
            "not_yet_measured": len(population) - len(done | {r.id for r in new}),
            "per_family": {f: sum(r.family == f for r in rows) for f in FAMILIES},
            "per_target": {t: sum(t in r.targets for r in rows) for t in TARGETS},
            "int8": sum(r.quantized for r in rows),
            "machine": here, "threads": cfg.threads, "trained_on": len(usable),
            "other_machines": {"rows": len(rows) - len(usable),
                               "note": "kept in the dataset, not trained on: latency is specific to a machine and a "
                                       "thread count"},
        },
        "held_out": report["table"],
        "goal": _goal(report["table"]),
        # How far two halves of one measurement of the same file disagree (median of the even vs the odd rounds):
        # the floor under any predictor's error on this machine at the time of this run.
        "cpu_label_noise_percent": {"mean": float(np.mean(noise)) * 100, "median": float(np.median(noise)) * 100}
        if noise else None,
        "time_s": {"prepare": times["prepare_s"], "timing": times["timing_s"], "training": training_s},
    }
    return stage.finish(metrics)


def main() -> None:
    stage_main("predictor", run)


if __name__ == "__main__":
    main()
