"""distill_data — a paired image-editing dataset per concept, distilled from the teacher.

Method: "Distilling GANs from diffusion models for real-time on-device editing" (E2GAN): the
teacher (any StableDiffusionPipeline folder) edits real prepared images by img2img / SDEdit at the
concept's strength and prompt. Each concept's pairs are validated with Great Expectations (count,
shapes, ranges, no NaN/inf, no duplicates, the edit changed the image, the digit is kept, the concept
shows) before anyone trains on them; a failed expectation fails the stage and is named.

Run per concept, as DVC's foreach does: `python -m tasks.distill_data bold`.
Outputs: data/distill_data/<concept>/{pairs,heldout}.{safetensors,csv} (train-split and held-out
test-split sources), concept.json (what the concept edits and the teacher's settings: what later stages
read), expectations.json, manifest.json;
metrics/distill_data/<concept>.json; plots/distill_data/<concept>.png.
"""

from __future__ import annotations

import pandas as pd
import torch

from condenser.core.config import DistillDataParams
from condenser.core.errors import DataError, StageError
from condenser.core.io import StagePaths, read_json, write_json
from condenser.core.plots import save_grid
from condenser.core.stage import Stage, stage_main
from condenser.data.images import load_split
from condenser.data.pairs import Pairs, save_pairs, write_concept
from condenser.data.validation import check, pair_expectations, pair_table
from condenser.distill.distill_data import concept_spec, concept_target, make_pairs
from condenser.models.judge import load_judge, predict
from condenser.models.teacher import load_img2img


def run(cfg: DistillDataParams, paths: StagePaths, concept: str) -> dict:
    if concept not in cfg.concepts:
        raise StageError(f"distill_data.concepts has no concept '{concept}' "
                         f"(known: {', '.join(cfg.concepts)})")
    stage = _stage(cfg, paths, concept)  # first: its wall time covers the generation
    prepared, teacher_dir = paths.data("prepare"), paths.data("teacher")
    meta = read_json(prepared / "meta.json")
    # Fail on a bad concept before loading any model.
    concept_target(cfg.concepts[concept], meta["styles"], meta["colors"], concept)
    pipe = load_img2img(teacher_dir)
    args = (cfg.concepts[concept], concept, meta["styles"], meta["colors"], cfg.steps, cfg.guidance_scale,
            cfg.batch_size)
    pairs = make_pairs(pipe, load_split(prepared, "train"), *args, cfg.seed)
    # Held-out test-split sources, another seed: the reference edits the GAN editors are scored against.
    heldout = make_pairs(pipe, load_split(prepared, "test"), *args, cfg.seed + 1, n=cfg.concepts[concept].heldout)
    return write_pairs(cfg, paths, concept, pairs, heldout, stage)


def _stage(cfg: DistillDataParams, paths: StagePaths, concept: str) -> Stage:
    params = {"concept": concept, **cfg.model_dump(exclude={"concepts"}), **cfg.concepts[concept].model_dump()}
    stage = Stage("distill_data", paths, params, seed=cfg.seed, item=concept)
    for p in (paths.data("prepare"), paths.data("evaluator"), paths.data("teacher")):
        stage.add_input(p)
    return stage


def write_pairs(cfg: DistillDataParams, paths: StagePaths, concept: str, pairs: Pairs, heldout: Pairs,
                stage: Stage | None = None) -> dict:
    """Judge and validate the pairs and held-out pairs; write them only if every expectation holds."""
    prepared = paths.data("prepare")
    meta = read_json(prepared / "meta.json")
    params = cfg.concepts[concept]
    head, _ = concept_target(params, meta["styles"], meta["colors"], concept)
    judge, _ = load_judge(paths.data("evaluator"))
    judged = {name: predict(judge, torch.nan_to_num(p.edits).clamp(0, 1))
              for name, p in (("pairs", pairs), ("heldout", heldout))}
    tables = {"pairs": pair_table(pairs, judged["pairs"], head, "pair"),
              "heldout": pair_table(heldout, judged["heldout"], head, "heldout")}
    # One suite over both sets: a bad held-out edit would corrupt every score measured against it.
    report = check(pd.concat(tables.values(), ignore_index=True),
                   pair_expectations(params.pairs + params.heldout, meta["resolution"], cfg.checks),
                   f"distill_data-{concept}")
    if not report.success:
        raise DataError(f"distill_data@{concept}: the teacher's pairs fail validation, so nothing is "
                        f"written.\n{report.describe()}\nAdjust distill_data.concepts.{concept} (strength, "
                        "prompt) or distill_data.checks, or improve the teacher.")

    table = tables["pairs"]
    other = "color" if head == "style" else "style"
    metrics = {
        "pairs": len(table),
        "heldout_pairs": len(tables["heldout"]),
        "concept_accuracy": float(table["concept_shown"].mean()),
        "content_preservation": float(table["digit_preserved"].mean()),
        f"{other}_preserved": float((judged["pairs"][other] == getattr(pairs, f"source_{other}")).float().mean()),
        "heldout_concept_accuracy": float(tables["heldout"]["concept_shown"].mean()),
        "heldout_content_preservation": float(tables["heldout"]["digit_preserved"].mean()),
        "mean_abs_diff": float(table["mean_abs_diff"].mean()),
        "seconds_per_pair": pairs.seconds_per_pair,
        "expectations": {"evaluated": len(report.results), "failed": 0},
    }
    stage = stage or _stage(cfg, paths, concept)
    with stage.output(artifact=f"{len(table)} (source, teacher img2img edit) pairs for concept '{concept}', "
                               f"and {len(tables['heldout'])} held-out pairs") as tmp:
        for name, p in (("pairs", pairs), ("heldout", heldout)):
            save_pairs(tmp, name, p, tables[name], meta["styles"], meta["colors"])
        write_concept(tmp, concept_spec(concept, params, cfg.steps, cfg.guidance_scale))
        write_json(tmp / "expectations.json", report.to_dict())
    # Rows of eight sources, each followed by the row of their edits.
    n = min(16, len(table)) // 8 * 8 or len(table)
    rows = [part for k in range(0, n, 8) for part in (pairs.sources[k:k + 8], pairs.edits[k:k + 8].clamp(0, 1))]
    save_grid(torch.cat(rows), stage.plots / f"{concept}.png", nrow=min(8, n))
    # seconds_per_pair varies run to run: metrics file only, not the hashed manifest.
    return stage.finish(metrics)


def main() -> None:
    stage_main("distill_data", run, items="concepts")


if __name__ == "__main__":
    main()
