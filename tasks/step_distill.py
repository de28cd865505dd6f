"""step_distill — a few-step student of the teacher that needs no classifier-free guidance.

Method: progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models"): starting from the teacher's `teacher_steps`-step DDIM sampler, each round trains a
student, initialised from its teacher, whose one DDIM step lands where two of its teacher's land,
halving the steps until `student_steps`. The first round's teacher is guided (CFG at `guidance_scale`, two
UNet passes per step); its student sees only the caption and reproduces the guided result in one pass
("On Distillation of Guided Diffusion Models", Meng et al. 2023; SnapFusion's CFG-aware distillation), so
later rounds distil unguided students. Trained on real latents of the prepared train split and their
caption embeddings; the first round, which also folds in the guidance, gets `first_round_steps`.

Scored in one run, on the test split's first `eval_images` captions with the same seeds: the teacher at
`reference_steps` with CFG (reference), the teacher at `student_steps` with CFG (no distillation), and the
students at 2 x student_steps and student_steps without CFG: FD to the real test images on the judge's
features, prompt accuracy per head, UNet evaluations per image (counted) and milliseconds per image.

Outputs: data/step_distill/ (a StableDiffusionPipeline folder sampling at student_steps with
guidance_scale 1, `condenser.json` saying so, each intermediate student as `student_<steps>/unet`, and
manifest.json); metrics/step_distill.json; plots/step_distill/{samples.png, loss.tsv}.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from condenser.core.config import StepDistillParams
from condenser.core.errors import StageError
from condenser.core.io import StagePaths, write_json
from condenser.core.plots import save_grid
from condenser.core.stage import Stage, stage_main
from condenser.data.images import load_split
from condenser.distill import step_distill as SD
from condenser.models import teacher as T
from condenser.models.judge import HEADS, load_judge
from condenser.quality import accuracy, fd

# The sample grid: this many captions, one row per model.
GRID_COLUMNS = 8


def run(cfg: StepDistillParams, paths: StagePaths) -> dict:
    prepared, judge_dir, teacher_dir = paths.data("prepare"), paths.data("evaluator"), paths.data("teacher")
    if not (teacher_dir / "model_index.json").is_file():
        raise StageError(f"{teacher_dir}: no teacher pipeline (model_index.json missing); run the teacher "
                         "stage first (dvc repro -s teacher)")
    stage = Stage("step_distill", paths, cfg.model_dump(), seed=cfg.seed)
    for p in (prepared, judge_dir, teacher_dir):
        stage.add_input(p)

    # 1. Load the teacher, the judge and the data; check the step counts against the teacher's schedule.
    teacher = T.load_checkpoint(teacher_dir)
    scheduler = SD.student_scheduler(teacher.scheduler)
    SD.check_steps(scheduler, cfg.teacher_steps)
    judge, _ = load_judge(judge_dir)
    train, val, test = (load_split(prepared, s) for s in ("train", "validation", "test"))
    accelerator = stage.accelerator(mixed_precision=cfg.mixed_precision)
    teacher.to(accelerator.device)

    # 2. Real training latents (the teacher's VAE, scaled as the pipeline scales them) and captions
    #    embedded exactly as the pipeline embeds them.
    resolution = T.resolution_of(teacher)
    images = train.float_images()
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
    mean, std = T.encode_latents(teacher.vae, images * 2 - 1)
    data = SD.TrainingSet(mean, std, teacher.vae.config.scaling_factor,
                          T.encode_captions(teacher.text_encoder, teacher.tokenizer, train.captions))

    # 3. Distil, round by round: teacher_steps -> ... -> student_steps.
    started = time.perf_counter()
    rounds = SD.progressive_distill(teacher.unet, teacher.scheduler, data, cfg, accelerator)
    train_time = time.perf_counter() - started
    students = {r.student_steps: _pipeline(teacher, unet, scheduler) for unet, r in rounds}

    # 4. Score every model on the same held-out captions and seeds.
    n = min(cfg.eval_images, len(test))
    captions, asked, real = test.captions[:n], {h: getattr(test, h)[:n] for h in HEADS}, test.float_images()
    runs = [("teacher", teacher, cfg.reference_steps, cfg.guidance_scale),
            ("teacher", teacher, cfg.student_steps, cfg.guidance_scale)]
    if 2 * cfg.student_steps in students:
        runs.append(("student", students[2 * cfg.student_steps], 2 * cfg.student_steps, 1.0))
    runs.append(("student", students[cfg.student_steps], cfg.student_steps, 1.0))
    models, samples = {}, {}
    for name, pipe, steps, guidance in runs:
        key = f"{name}_{steps}"
        samples[key], models[key] = _score(pipe, captions, steps, guidance, cfg, judge, real, asked)
        models[key]["model"] = name
    reference = models[f"teacher_{cfg.reference_steps}"]
    baseline, student = models[f"teacher_{cfg.student_steps}"], models[f"student_{cfg.student_steps}"]
    for m in models.values():
        m["fd_to_reference"] = m["fd"] / reference["fd"]
    metrics = {
        "models": models,
        "ratios": {
            "student_fd_to_reference": student["fd"] / reference["fd"],
            "baseline_fd_to_student": baseline["fd"] / student["fd"],
            "unet_eval_reduction": reference["unet_evals_per_image"] / student["unet_evals_per_image"],
            "speedup": reference["ms_per_image"] / student["ms_per_image"],
        },
        "fd_floor_validation_vs_test": fd(judge, val.float_images()[:n], real),
        "eval_images": n,
        "seed": cfg.seed,
        "rounds": [{"teacher_steps": r.teacher_steps, "student_steps": r.student_steps,
                    "train_steps": len(r.losses), "first_loss": _mean(r.losses[:10]),
                    "final_loss": _mean(r.losses[-20:]), "wall_time_s": r.wall_time_s} for _, r in rounds],
        "train_wall_time_s": train_time,
        "device": str(accelerator.device),
    }

    # 5. Write the student pipeline (and each intermediate student's UNet) atomically, then metrics, plots.
    final = students[cfg.student_steps]
    sampling = {"num_inference_steps": cfg.student_steps, "guidance_scale": 1.0,
                "distilled_from_steps": cfg.teacher_steps, "distilled_guidance_scale": cfg.guidance_scale,
                "intermediate_students": sorted(s for s in students if s != cfg.student_steps)}
    with stage.output(artifact=f"StableDiffusionPipeline, progressive-distilled student: "
                               f"{cfg.student_steps} DDIM steps, guidance_scale 1", sampling=sampling) as tmp:
        final.save_pretrained(tmp, safe_serialization=True)
        for steps, pipe in students.items():
            if steps != cfg.student_steps:
                pipe.unet.save_pretrained(tmp / f"student_{steps}" / "unet", safe_serialization=True)
        write_json(tmp / SD.SAMPLING_FILE, sampling)
    rows = [f"teacher_{cfg.reference_steps}", f"teacher_{cfg.student_steps}", f"student_{cfg.student_steps}"]
    save_grid(torch.cat([samples[k][:GRID_COLUMNS] for k in rows]), stage.plots / "samples.png",
              nrow=GRID_COLUMNS)
    _write_losses(stage.plots / "loss.tsv", [r for _, r in rounds])
    # The metrics hold timings, so they go to the (uncached) metrics file, not the hashed manifest.
    return stage.finish(metrics)


def _pipeline(teacher: StableDiffusionPipeline, unet, scheduler) -> StableDiffusionPipeline:
    """A student pipeline: its UNet and DDIM sampler with the teacher's VAE and text encoder."""
    pipe = StableDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder,
                                   tokenizer=teacher.tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _score(pipe: StableDiffusionPipeline, captions: list[str], steps: int, guidance: float,
           cfg: StepDistillParams, judge, real: torch.Tensor, asked: dict) -> tuple[torch.Tensor, dict]:
    """Sample the captions and measure: FD, prompt accuracy, UNet evaluations (counted) and time per image."""
    evaluated = []
    # The pipeline batches CFG's two passes into one call: count rows, not calls.
    hook = pipe.unet.register_forward_pre_hook(
        lambda _, args, kwargs: evaluated.append(len(args[0] if args else kwargs["sample"])), with_kwargs=True)
    try:
        started = time.perf_counter()
        images = T.sample(pipe, captions, steps, guidance, cfg.seed, cfg.eval_batch_size)
        elapsed = time.perf_counter() - started
    finally:
        hook.remove()
    return images, {"steps": steps, "guidance_scale": guidance,
                    "unet_evals_per_image": sum(evaluated) / len(captions),
                    "ms_per_image": elapsed / len(captions) * 1000,
                    "fd": fd(judge, images, real), "prompt_accuracy": accuracy(judge, images, asked)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _write_losses(path, rounds: list[SD.Round]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{r.student_steps}\t{i}\t{loss:.6f}\n" for r in rounds for i, loss in enumerate(r.losses)]
    path.write_text("student_steps\tstep\tloss\n" + "".join(lines))


def main() -> None:
    stage_main("step_distill", run)


if __name__ == "__main__":
    main()
