"""teacher — the text-to-image diffusion model every compression stage starts from.

Method: latent diffusion in Stable Diffusion format (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"): a small AutoencoderKL, then a UNet2DConditionModel with
cross-attention to a frozen text encoder (all-MiniLM-L6-v2 by default), trained with v-prediction
("Progressive Distillation for Fast Sampling of Diffusion Models"), Min-SNR weighting ("Efficient
Diffusion Training via Min-SNR Weighting Strategy"), classifier-free guidance caption dropout
("Classifier-Free Diffusion Guidance"), EMA weights and a warmup + cosine schedule; sampled with DDIM.
With `teacher.checkpoint`, a user's local SD folder is fine-tuned (UNet only) or passed through.

Scored on held-out captions (the test split's): FD on the judge's features against the real test
images, next to the floor of real validation vs real test images, and prompt accuracy per head.

Outputs: data/teacher/ (a StableDiffusionPipeline folder + manifest.json); metrics/teacher.json;
plots/teacher/{samples.png, loss.tsv}.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from condenser.core.config import TeacherParams
from condenser.core.io import StagePaths
from condenser.core.plots import save_grid
from condenser.core.stage import Stage, stage_main
from condenser.data.images import load_split
from condenser.models import teacher as T
from condenser.models.common import parameter_count
from condenser.models.judge import HEADS, load_judge
from condenser.quality import accuracy, fd
from condenser.train.teacher import latent_scaling_factor, train_unet, train_vae

SAMPLES_PER_DIGIT = 8


def run(cfg: TeacherParams, paths: StagePaths) -> dict:
    prepared, judge_dir = paths.data("prepare"), paths.data("evaluator")
    stage = Stage("teacher", paths, cfg.model_dump(), seed=cfg.seed)
    for p in (prepared, judge_dir):
        stage.add_input(p)

    # 1. Load the model to train or pass on: a checkpoint is checked before any long work.
    if cfg.checkpoint is not None:
        pipe = T.load_checkpoint(cfg.checkpoint)
        stage.add_input(cfg.checkpoint)
    train, val, test = (load_split(prepared, s) for s in ("train", "validation", "test"))
    judge, _ = load_judge(judge_dir)
    if cfg.checkpoint is None:
        text_encoder, tokenizer = T.load_text_encoder(cfg.text_encoder, cfg.max_caption_tokens)
        set_seed(cfg.seed)
        pipe = T.build_pipeline(cfg, train.images.shape[-1], text_encoder, tokenizer)
    accelerator = stage.accelerator(mixed_precision=cfg.train.mixed_precision)
    pipe.to(accelerator.device)
    resolution = T.resolution_of(pipe)
    images = train.float_images()
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
    images = images * 2 - 1

    # 2. Train: the VAE (from scratch only), then the UNet on its latents.
    vae_result = unet_result = None
    started = time.perf_counter()
    if cfg.mode == "train":
        vae_result = train_vae(pipe.vae, images, cfg.vae, cfg.seed, accelerator)
    if cfg.mode in ("train", "finetune"):
        latents = T.encode_latents(pipe.vae, images)
        if cfg.mode == "train":
            pipe.vae.register_to_config(scaling_factor=latent_scaling_factor(*latents))
        captions = T.encode_captions(pipe.text_encoder, pipe.tokenizer, train.captions)
        unet_result = train_unet(pipe.unet, pipe.scheduler, latents, pipe.vae.config.scaling_factor,
                                   captions, cfg.train, cfg.seed, accelerator)
    train_time = time.perf_counter() - started

    # 3. Score on held-out captions at the default sampler settings.
    n = min(cfg.sample.eval_images, len(test))
    asked = {h: getattr(test, h)[:n] for h in HEADS}
    started = time.perf_counter()
    generated = T.sample(pipe, test.captions[:n], cfg.sample.steps, cfg.sample.guidance_scale, cfg.seed,
                         cfg.sample.batch_size)
    sample_ms = (time.perf_counter() - started) / n * 1000
    real = test.float_images()
    generated_fd = fd(judge, generated, real)
    # The floor: as many real validation images as generated ones, against the same test images.
    floor = fd(judge, val.float_images()[:n], real)
    metrics = {
        "mode": cfg.mode,
        "prompt_accuracy": accuracy(judge, generated, asked),
        "fd": generated_fd,
        "fd_floor_validation_vs_test": floor,
        "fd_ratio_to_floor": generated_fd / floor if floor > 0 else float("inf"),
        "eval_images": n,
        "sampler": {"steps": cfg.sample.steps, "guidance_scale": cfg.sample.guidance_scale,
                    "ms_per_image": sample_ms},
        "train": {
            "wall_time_s": train_time,
            "vae_wall_time_s": vae_result.wall_time_s if vae_result else 0.0,
            "unet_wall_time_s": unet_result.wall_time_s if unet_result else 0.0,
            "unet_steps": len(unet_result.losses) if unet_result else 0,
            "unet_steps_per_s": unet_result.steps_per_s if unet_result else 0.0,
            "unet_final_loss": _tail_mean(unet_result.losses) if unet_result else None,
        },
        "parameters": {"unet": parameter_count(pipe.unet), "vae": parameter_count(pipe.vae),
                       "text_encoder": parameter_count(pipe.text_encoder)},
        "device": str(accelerator.device),
    }

    # 4. Write the pipeline, atomically, then the metrics and plots.
    with stage.output(artifact=f"StableDiffusionPipeline {resolution}x{resolution} "
                      f"({cfg.mode}{', from ' + cfg.checkpoint if cfg.checkpoint else ''})") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    save_grid(_by_digit(generated, asked["digit"]), stage.plots / "samples.png", nrow=SAMPLES_PER_DIGIT)
    _write_losses(stage.plots / "loss.tsv", unet_result.losses if unet_result else [])
    # The metrics hold timings, so they go to the (uncached) metrics file, not the hashed manifest.
    return stage.finish(metrics)


def _tail_mean(losses: list[float], last: int = 100) -> float:
    tail = losses[-last:]
    return sum(tail) / len(tail) if tail else 0.0


def _by_digit(images: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """Up to SAMPLES_PER_DIGIT images per asked digit, one row per digit (0 first); as-is if unlabelled."""
    if (digits < 0).all():
        return images[: SAMPLES_PER_DIGIT * 10]
    rows = []
    for d in range(10):
        picked = images[digits == d][:SAMPLES_PER_DIGIT]
        pad = torch.zeros(SAMPLES_PER_DIGIT - len(picked), *images.shape[1:])
        rows.append(torch.cat([picked, pad]))
    return torch.cat(rows)


def _write_losses(path, losses: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step\tloss\n" + "".join(f"{i}\t{loss:.6f}\n" for i, loss in enumerate(losses)))


def main() -> None:
    stage_main("teacher", run)


if __name__ == "__main__":
    main()
