"""prepare — the dataset every later stage trains and is judged on.

Embedded default: scikit-learn's bundled handwritten digits rendered in stroke styles and colours with
captions ("a bold red handwritten seven"). Or a user folder of images with `captions.csv`. The result is
validated with Great Expectations before anything trains on it; a failed expectation fails the stage,
naming the expectation and the offending files.

Outputs: data/prepare/{train,validation,test}.{safetensors,csv}, meta.json, expectations.json,
manifest.json; metrics/prepare.json; plots/prepare/samples.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from condenser.core.config import PrepareParams
from condenser.core.errors import DataError
from condenser.core.io import StagePaths, write_json
from condenser.core.plots import save_grid
from condenser.core.stage import Stage, stage_main
from condenser.data.digits import embedded_digits
from condenser.data.folder import user_folder
from condenser.data.images import SPLITS, save_split, split_indices
from condenser.data.validation import check, image_table, prepared_expectations


def run(cfg: PrepareParams, paths: StagePaths) -> dict:
    stage = Stage("prepare", paths, cfg.model_dump(), seed=cfg.seed)

    # 1. Load or render the images.
    if cfg.source == "digits":
        data, groups = embedded_digits(cfg.styles, cfg.colors, cfg.resolution, cfg.variants_per_image,
                                       cfg.seed, cfg.max_images)
        raw = data.images.float().numpy()
        source = "scikit-learn digits (bundled)"
    else:
        folder = Path(cfg.folder)
        raw, data = user_folder(folder, cfg.resolution, cfg.styles, cfg.colors)
        groups = np.arange(len(data))
        stage.add_input(folder)
        source = str(folder)

    # 2. Split by source scan, so no scan is in two splits.
    splits = split_indices(groups, cfg.split.validation, cfg.split.test, cfg.seed)
    split_of = np.empty(len(data), dtype=object)
    for name, idx in splits.items():
        split_of[idx] = name

    # 3. Validate before anything is written.
    labelled = {h: bool((getattr(data, h) >= 0).all()) for h in ("digit", "style", "color")}
    report = check(image_table(raw, data, split_of),
                   prepared_expectations(cfg.resolution, len(cfg.styles), len(cfg.colors), labelled),
                   "prepare")
    if not report.success:
        raise DataError(report.describe() + "\nFix or remove the named files (prepare.folder), "
                        "or change the prepare params, and rerun.")

    # 4. Write the splits, atomically.
    with stage.output(artifact=f"captioned images {cfg.resolution}x{cfg.resolution} from {source}") as tmp:
        for name in SPLITS:
            save_split(tmp, name, data.subset(splits[name]))
        write_json(tmp / "expectations.json", report.to_dict())
        write_json(tmp / "meta.json", {"resolution": cfg.resolution, "styles": cfg.styles,
                                       "colors": cfg.colors, "labelled": labelled, "source": source,
                                       "counts": {n: len(splits[n]) for n in SPLITS}})

    first = torch.as_tensor(np.sort(splits["train"])[:32])
    save_grid(data.images[first], stage.plots / "samples.png", nrow=8)
    return stage.finish({"images": {n: len(splits[n]) for n in SPLITS},
                         "expectations": {"evaluated": len(report.results), "failed": len(report.failures)},
                         "classes": {"styles": len(cfg.styles), "colors": len(cfg.colors)}})


def main() -> None:
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
