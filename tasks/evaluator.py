"""evaluator — the judge every generated image is scored with.

A small CNN classifier of digit, style and colour trained on the prepared train split. Its penultimate
features give the Fréchet distance (FD, the analogue of FID) and its predictions the prompt accuracy
(the analogue of CLIP score) of generated images. Reports its test accuracy per head.

Outputs: data/evaluator/{judge.safetensors, judge_config.json, manifest.json}; metrics/evaluator.json.
"""

from __future__ import annotations

import torch

from condenser.core.config import EvaluatorParams
from condenser.core.errors import StageError
from condenser.core.io import StagePaths, read_json
from condenser.core.stage import Stage, stage_main
from condenser.data.images import load_split
from condenser.models.judge import HEADS, JudgeConfig, save_judge
from condenser.quality import accuracy, fd
from condenser.train.judge import train_judge


def run(cfg: EvaluatorParams, paths: StagePaths) -> dict:
    prepared = paths.data("prepare")
    stage = Stage("evaluator", paths, cfg.model_dump(), seed=cfg.seed)
    stage.add_input(prepared)
    meta = read_json(prepared / "meta.json")
    if not all(meta["labelled"].values()):
        missing = [h for h, ok in meta["labelled"].items() if not ok]
        raise StageError(f"{prepared / 'meta.json'}: the judge needs digit, style and color labels for "
                         f"every image, but {', '.join(missing)} are missing; add those columns to the "
                         "captions.csv of prepare.folder")
    train, val, test = (load_split(prepared, s) for s in ("train", "validation", "test"))

    def labels(split):
        return {h: getattr(split, h) for h in HEADS}

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    config = JudgeConfig(n_styles=len(meta["styles"]), n_colors=len(meta["colors"]), width=cfg.width,
                         feature_dim=cfg.feature_dim)
    judge = train_judge(train.float_images(), labels(train), config, cfg.epochs, cfg.batch_size, cfg.lr,
                        cfg.seed)
    metrics = {
        "test_accuracy": accuracy(judge, test.float_images(), labels(test)),
        "validation_accuracy": accuracy(judge, val.float_images(), labels(val)),
        # FD's floor for this data: real validation images against real test images.
        "fd_validation_vs_test": fd(judge, val.float_images(), test.float_images()),
    }
    # The manifest carries the metrics too: no timings in these, so it is stable on a rerun.
    with stage.output(artifact="judge classifier (digit, style, colour) in safetensors", metrics=metrics) as tmp:
        save_judge(judge, tmp, styles=meta["styles"], colors=meta["colors"])
    return stage.finish(metrics)


def main() -> None:
    stage_main("evaluator", run)


if __name__ == "__main__":
    main()
