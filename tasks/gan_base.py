"""gan_base — one image-to-image GAN trained on the pooled distilled pairs of the base concepts.

Method: "Distilling GANs from diffusion models for real-time on-device editing" (METHODS.md). A
pix2pix-style generator with FiLM concept codes (condenser/editor.py says why codes) and a conditional
patch discriminator learn the teacher's img2img edits of every concept in `gan_base.concepts` at once,
with L1 + LSGAN loss. Mixing concepts makes the generator's features general, so a new concept later
needs only a LoRA (the lora stage). Of each concept's pairs, `validation_fraction` is held back, so
lora can choose ranks on pairs neither stage trained on.

Scored on each concept's held-out test-split pairs against the teacher's edits: PSNR, SSIM, judge
concept accuracy and content preservation, next to the teacher's own (the reference row).

Outputs: data/gan_base/{generator,discriminator}.safetensors + *_config.json, training.json (the
objective and split lora reuses), manifest.json; metrics/gan_base.json; plots/gan_base/{edits.png,
loss.tsv}.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from condenser import editor as E
from condenser.config import GanBaseParams
from condenser.io import Manifest, StagePaths, atomic_dir, write_json
from condenser.judge import load_judge
from condenser.plots import save_grid
from condenser.stage import StageError, stage_main

def run(cfg: GanBaseParams, paths: StagePaths) -> dict:
    check_dvc_deps(paths.root, cfg.concepts)
    concept_dirs = {c: paths.data("distill_data", c) for c in cfg.concepts}
    settings = {c: E.concept_settings(d) for c, d in concept_dirs.items()}
    judge, _ = load_judge(paths.data("evaluator"))
    manifest = Manifest("gan_base", paths.root, cfg.model_dump(), seed=cfg.seed)
    manifest.add_input(paths.data("evaluator"))
    train_parts, heldout = [], {}
    for c, d in concept_dirs.items():
        manifest.add_input(d)
        pairs = E.load_pairs(d, c)
        train_idx, _ = E.split_pairs(len(pairs), cfg.validation_fraction, cfg.seed)
        train_parts.append(pairs.subset(train_idx))
        heldout[c] = E.load_pairs(d, c, "heldout.safetensors")
    train = E.EditPairs.cat(train_parts)
    names = tuple(cfg.concepts)

    g = cfg.generator
    generator = E.Generator(E.GeneratorConfig(names, channels=g.channels, blocks=g.blocks, block=g.block,
                                              code_dim=g.code_dim))
    discriminator = E.Discriminator(E.DiscriminatorConfig(names, channels=cfg.discriminator_channels))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    result = E.train_gan(generator, discriminator, train, names, cfg.steps, cfg.batch_size, cfg.lr, cfg.disc_lr,
                         cfg.l1_weight, cfg.adv_weight, cfg.seed, accelerator, desc="gan_base: training")

    per_concept, grid = {}, []
    for c in names:
        pairs = heldout[c]
        edits = E.edit_images(generator, pairs.sources, c, names)
        teacher = E.edit_quality((pairs.edits + 1) / 2, pairs, judge, settings[c]["head"])
        per_concept[c] = {"gan": E.edit_quality(edits, pairs, judge, settings[c]["head"]),
                          "teacher": {k: teacher[k] for k in ("concept_accuracy", "content_preservation")},
                          "heldout_pairs": len(pairs)}
        grid += [(pairs.sources[:8] + 1) / 2, (pairs.edits[:8] + 1) / 2, edits[:8]]
    example = torch.zeros(1, 3, *train.sources.shape[-2:])
    index = torch.zeros(1, dtype=torch.long)
    metrics = {
        "concepts": per_concept,
        "train_pairs": len(train),
        "generator_parameters": E.parameter_count(generator),
        "discriminator_parameters": E.parameter_count(discriminator),
        "train_wall_time_s": result.wall_time_s,
        "final_l1": sum(result.losses["g_l1"][-50:]) / len(result.losses["g_l1"][-50:]),
        "ms_per_edit_batch1": E.latency_ms(lambda: generator(example, index), 100),
        "device": str(accelerator.device),
    }
    with atomic_dir(paths.data("gan_base")) as tmp:
        E.save_model(generator, tmp)
        E.save_model(discriminator, tmp)
        # What lora must reuse to fine-tune with the same objective on the same split.
        write_json(tmp / E.TRAINING_FILE, {"l1_weight": cfg.l1_weight, "adv_weight": cfg.adv_weight,
                                         "validation_fraction": cfg.validation_fraction, "seed": cfg.seed,
                                         "concepts": list(names), "resolution": train.sources.shape[-1]})
        manifest.write(tmp, artifact=f"base GAN editor (generator {metrics['generator_parameters']:,} params) "
                                     f"for concepts {', '.join(names)}", device=str(accelerator.device))
    plots = paths.plots("gan_base")
    # Per concept: held-out sources, the teacher's edits, the GAN's edits.
    save_grid(torch.cat(grid), plots / "edits.png", nrow=8)
    (plots / "loss.tsv").write_text("step\tg_l1\tg_adv\td\n" + "".join(
        f"{i}\t{a:.5f}\t{b:.5f}\t{d:.5f}\n"
        for i, (a, b, d) in enumerate(zip(*(result.losses[k] for k in ("g_l1", "g_adv", "d"))))))
    metrics["run"] = manifest.run_record()
    write_json(paths.metrics("gan_base"), metrics)
    return metrics


def check_dvc_deps(root: Path, concepts: list[str]) -> None:
    """dvc.yaml must list exactly the base concepts' pair folders as gan_base deps, or DVC would rerun
    gan_base for the wrong changes (or miss the right ones)."""
    dvc_file = Path(root) / "dvc.yaml"
    if not dvc_file.is_file():
        return  # run outside a DVC project (a test, a notebook): nothing to keep in step
    deps = yaml.safe_load(dvc_file.read_text()).get("stages", {}).get("gan_base", {}).get("deps", [])
    listed = {d.removeprefix("data/distill_data/") for d in deps if d.startswith("data/distill_data/")}
    if listed != set(concepts):
        raise StageError(f"{dvc_file}: stages.gan_base.deps list the pairs of {sorted(listed)} but "
                         f"params.yaml gan_base.concepts is {sorted(concepts)}; list data/distill_data/<concept> "
                         "for exactly the gan_base concepts")


def main() -> None:
    stage_main("gan_base", run)


if __name__ == "__main__":
    main()
