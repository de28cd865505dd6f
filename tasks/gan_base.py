"""gan_base — one image-to-image GAN trained on the pooled distilled pairs of the base concepts.

Method: "Distilling GANs from diffusion models for real-time on-device editing" (E2GAN). A
pix2pix-style generator with FiLM concept codes (condenser/models/editor.py says why codes) and a
conditional patch discriminator learn the teacher's img2img edits of every concept in `gan_base.concepts`
at once, with L1 + LSGAN loss. Mixing concepts makes the generator's features general, so a new concept
later needs only a LoRA (the lora stage). Of each concept's pairs, `validation_fraction` is held back, so
lora can choose ranks on pairs neither stage trained on.

Scored on each concept's held-out test-split pairs against the teacher's edits: PSNR, SSIM, judge
concept accuracy and content preservation, next to the teacher's own (the reference row).

Outputs: data/gan_base/{generator,discriminator}.safetensors + *_config.json, training.json (the
objective and split lora reuses), manifest.json; metrics/gan_base.json; plots/gan_base/{edits.png,
loss.tsv}.
"""

from __future__ import annotations

import torch
from accelerate.utils import set_seed

from condenser.core.config import GanBaseParams
from condenser.core.io import StagePaths
from condenser.core.plots import save_grid
from condenser.core.stage import Stage, stage_main
from condenser.data.pairs import EditPairs, load_pairs, read_concept, split_pairs
from condenser.models.common import parameter_count
from condenser.models.editor import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    edit_images,
    save_model,
)
from condenser.models.judge import load_judge
from condenser.quality import edit_quality
from condenser.runtime.measure import latency
from condenser.train.gan import GanObjective, train_gan


def run(cfg: GanBaseParams, paths: StagePaths) -> dict:
    concept_dirs = {c: paths.data("distill_data", c) for c in cfg.concepts}
    heads = {c: read_concept(d).head for c, d in concept_dirs.items()}
    judge, _ = load_judge(paths.data("evaluator"))
    stage = Stage("gan_base", paths, cfg.model_dump(), seed=cfg.seed)
    stage.add_input(paths.data("evaluator"))
    train_parts, heldout = [], {}
    for c, d in concept_dirs.items():
        stage.add_input(d)
        pairs = load_pairs(d, c)
        train_idx, _ = split_pairs(len(pairs), cfg.validation_fraction, cfg.seed)
        train_parts.append(pairs.subset(train_idx))
        heldout[c] = load_pairs(d, c, "heldout.safetensors")
    train = EditPairs.cat(train_parts)
    names = tuple(cfg.concepts)

    # Seed before building the networks: torch's default generator starts from a random seed in every
    # process, so an unseeded initialisation (train_gan seeds only its own loop) differs run to run.
    set_seed(cfg.seed)
    g = cfg.generator
    generator = Generator(GeneratorConfig(names, channels=g.channels, blocks=g.blocks, block=g.block,
                                          code_dim=g.code_dim))
    discriminator = Discriminator(DiscriminatorConfig(names, channels=cfg.discriminator_channels))
    accelerator = stage.accelerator(mixed_precision=cfg.mixed_precision)
    result = train_gan(generator, discriminator, train, names, cfg.steps, cfg.batch_size, cfg.lr, cfg.disc_lr,
                       cfg.l1_weight, cfg.adv_weight, cfg.seed, accelerator, desc="gan_base: training")

    per_concept, grid = {}, []
    for c in names:
        pairs = heldout[c]
        edits = edit_images(generator, pairs.sources, c, names)
        teacher = edit_quality((pairs.edits + 1) / 2, pairs, judge, heads[c])
        per_concept[c] = {"gan": edit_quality(edits, pairs, judge, heads[c]),
                          "teacher": {k: teacher[k] for k in ("concept_accuracy", "content_preservation")},
                          "heldout_pairs": len(pairs)}
        grid += [(pairs.sources[:8] + 1) / 2, (pairs.edits[:8] + 1) / 2, edits[:8]]
    example = torch.zeros(1, 3, *train.sources.shape[-2:])
    index = torch.zeros(1, dtype=torch.long)
    metrics = {
        "concepts": per_concept,
        "train_pairs": len(train),
        "generator_parameters": parameter_count(generator),
        "discriminator_parameters": parameter_count(discriminator),
        "train_wall_time_s": result.wall_time_s,
        "final_l1": sum(result.losses["g_l1"][-50:]) / len(result.losses["g_l1"][-50:]),
        "ms_per_edit_batch1": latency(lambda: generator(example, index), 100).median_ms,
        "device": stage.device,
    }
    objective = GanObjective(l1_weight=cfg.l1_weight, adv_weight=cfg.adv_weight,
                             validation_fraction=cfg.validation_fraction, seed=cfg.seed, concepts=list(names),
                             resolution=train.sources.shape[-1])
    with stage.output(artifact=f"base GAN editor (generator {metrics['generator_parameters']:,} params) "
                               f"for concepts {', '.join(names)}") as tmp:
        save_model(generator, tmp)
        save_model(discriminator, tmp)
        objective.save(tmp)  # what lora must reuse to fine-tune with the same objective on the same split
    # Per concept: held-out sources, the teacher's edits, the GAN's edits.
    save_grid(torch.cat(grid), stage.plots / "edits.png", nrow=8)
    (stage.plots / "loss.tsv").write_text("step\tg_l1\tg_adv\td\n" + "".join(
        f"{i}\t{a:.5f}\t{b:.5f}\t{d:.5f}\n"
        for i, (a, b, d) in enumerate(zip(*(result.losses[k] for k in ("g_l1", "g_adv", "d"))))))
    return stage.finish(metrics)


def main() -> None:
    stage_main("gan_base", run)


if __name__ == "__main__":
    main()
