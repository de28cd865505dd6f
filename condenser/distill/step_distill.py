"""step_distill: progressive step distillation of a guided text-to-image diffusion model.

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models": a student is
trained so that one of its DDIM steps lands where two DDIM steps of its teacher land; the student of one
round is the teacher of the next, so each round halves the sampler's steps. The teacher's steps use
classifier-free guidance (two UNet passes per step) while the student sees only the caption and learns
the guided result in one pass (Meng et al. 2023, "On Distillation of Guided Diffusion Models"; the CFG-
aware distillation of SnapFusion, Li et al. 2023), so it samples with guidance_scale 1.

The arithmetic is DDIMScheduler's own (eta 0): a step of an N-step sampler goes from timestep t to
t - T // N (T training timesteps), and a negative destination means the scheduler's final alpha. The
student is trained on exactly the timesteps and alphas its saved scheduler uses at inference.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from condenser.core.config import StepDistillParams
from condenser.core.errors import ConfigError
from condenser.models.teacher import Captions

# Written into the student's folder: how to sample it (steps, guidance), for its users and the bench.
SAMPLING_FILE = "condenser.json"


@dataclass
class TrainingSet:
    """Real training latents and their captions, as the teacher was trained on them.

    `mean` and `std` [N, C, h, w] are the VAE posterior of each image, unscaled: a fresh latent is drawn
    per step and multiplied by `scaling_factor` (vae.config.scaling_factor).
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    captions: Captions


@dataclass
class Round:
    """One halving: its teacher's steps, the student's steps and the distillation loss per train step."""

    teacher_steps: int
    student_steps: int
    losses: list[float]
    wall_time_s: float


def student_scheduler(scheduler) -> DDIMScheduler:
    """The sampler every round distils into and the student ships with: DDIM on the teacher's noise
    schedule and prediction type, with trailing timesteps and no clipping.

    Trailing spacing makes even a 4-step sampler start at the last training timestep (pure noise);
    clipping x0 would change the steps after training, so the matched trajectories would no longer match.
    """
    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                     thresholding=False)


def check_steps(scheduler: DDIMScheduler, teacher_steps: int) -> None:
    if teacher_steps > scheduler.config.num_train_timesteps:
        raise ConfigError(f"step_distill.teacher_steps ({teacher_steps}) exceeds the teacher's "
                         f"{scheduler.config.num_train_timesteps} training timesteps; lower it")


def alpha_bar(scheduler: DDIMScheduler, t: torch.Tensor) -> torch.Tensor:
    """Cumulative alpha per timestep [B, 1, 1, 1] in float64; negative t is the final alpha, as in DDIM."""
    alphas = scheduler.alphas_cumprod.to(t.device, torch.float64)
    final = scheduler.final_alpha_cumprod.to(t.device, torch.float64)
    return torch.where(t >= 0, alphas[t.clamp(min=0)], final).view(-1, 1, 1, 1)


def step_size(scheduler: DDIMScheduler, steps: int) -> int:
    return scheduler.config.num_train_timesteps // steps


def to_x0_eps(output: torch.Tensor, z: torch.Tensor, a: torch.Tensor, prediction_type: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise a model output implies at noisy latent z, cumulative alpha a."""
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (z - s1 * output) / sa, output
    if prediction_type == "v_prediction":
        return sa * z - s1 * output, sa * output + s1 * z
    if prediction_type == "sample":
        return output, (z - sa * output) / s1
    raise ValueError(f"unsupported scheduler prediction_type '{prediction_type}'")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def guided_output(unet: UNet2DConditionModel, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The UNet output with classifier-free guidance, one batched pass as StableDiffusionPipeline does;
    at guidance_scale 1 the conditional pass alone, as the pipeline samples then."""
    if guidance_scale == 1:
        return unet(z, t, encoder_hidden_states=cond).sample.float()
    out = unet(torch.cat([z, z]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    out_uncond, out_cond = out.float().chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


@torch.no_grad()
def two_step_target(teacher: UNet2DConditionModel, scheduler: DDIMScheduler, z: torch.Tensor,
                    t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, teacher_steps: int,
                    guidance_scale: float, accelerator: Accelerator) -> torch.Tensor:
    """The x0 with which one student DDIM step from (z, t) lands where two guided teacher steps land.

    Salimans & Ho's Algorithm 2: the teacher steps t -> t - T//N -> t - T//(N/2) (the student's
    destination); then x0 solves  z_end = a_end x0 + s_end (z - a_t x0) / s_t.
    """
    prediction_type = scheduler.config.prediction_type
    t_mid = t - step_size(scheduler, teacher_steps)
    t_end = t - step_size(scheduler, teacher_steps // 2)
    a_t, a_mid, a_end = (alpha_bar(scheduler, s) for s in (t, t_mid, t_end))
    z64 = z.double()
    with accelerator.autocast():
        out = guided_output(teacher, z, t, cond, uncond, guidance_scale)
    z_mid = ddim_step(*to_x0_eps(out.double(), z64, a_t, prediction_type), a_mid)
    with accelerator.autocast():
        out = guided_output(teacher, z_mid.float(), t_mid, cond, uncond, guidance_scale)
    z_end = ddim_step(*to_x0_eps(out.double(), z_mid, a_mid, prediction_type), a_end)
    ratio = (1 - a_end).sqrt() / (1 - a_t).sqrt()
    x0 = (z_end - ratio * z64) / (a_end.sqrt() - ratio * a_t.sqrt())
    return x0.float()


def distill_round(teacher: UNet2DConditionModel, scheduler: DDIMScheduler, data: TrainingSet,
                  teacher_steps: int, guidance_scale: float, train_steps: int, cfg: StepDistillParams,
                  seed: int, accelerator: Accelerator) -> tuple[UNet2DConditionModel, Round]:
    """Train a copy of `teacher` to sample in teacher_steps // 2 steps; returns it and the round's losses.

    `scheduler` is the DDIM sampler both sample with (`student_scheduler` of the teacher's); the teacher
    samples at `guidance_scale`, the student always at 1.

    1. Start the student from the teacher's weights (a good initial guess: the teacher's one step).
    2. Each train step: draw real latents and captions, noise them at random student-grid timesteps,
       let the frozen teacher take its two steps, and regress the student's x0 (from its one, unguided
       pass) on the x0 that lands in the same place.
    3. Weigh each sample by max(SNR, 1) ("truncated SNR" weighting): x0 errors matter more at low noise,
       while the weight stays finite at the pure-noise end where x0 is barely determined.
    """
    check_steps(scheduler, teacher_steps)
    student_steps = teacher_steps // 2
    prediction_type = scheduler.config.prediction_type
    set_seed(seed)
    device = accelerator.device
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=max(train_steps, 1))
    student, opt, lr_sched = accelerator.prepare(student, opt, lr_sched)

    grid = copy.deepcopy(scheduler)
    grid.set_timesteps(student_steps)
    timesteps = grid.timesteps.clone()
    embeddings = data.captions.embeddings.to(device)
    uncond_row = embeddings[data.captions.unconditional]
    gen = torch.Generator().manual_seed(seed + accelerator.process_index)
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(train_steps), desc=f"step_distill: {teacher_steps} -> {student_steps} steps",
                  disable=not accelerator.is_main_process):
        idx = torch.randint(len(data.mean), (cfg.batch_size,), generator=gen)
        x0 = data.mean[idx] + data.std[idx] * torch.randn(data.mean[idx].shape, generator=gen)
        x0 = x0 * data.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        t = timesteps[torch.randint(len(timesteps), (cfg.batch_size,), generator=gen)]
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        cond = embeddings[data.captions.index[idx].to(device)]
        uncond = uncond_row.expand_as(cond)
        a_t = alpha_bar(scheduler, t)
        z = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise).float()
        target = two_step_target(teacher, scheduler, z, t, cond, uncond, teacher_steps, guidance_scale,
                                 accelerator)
        with accelerator.autocast():
            out = student(z, t, encoder_hidden_states=cond).sample
        pred, _ = to_x0_eps(out.float(), z, a_t.float(), prediction_type)
        weight = (a_t / (1 - a_t)).clamp(min=1).float().view(-1)
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
    wall = time.perf_counter() - start
    student = accelerator.unwrap_model(student).eval().requires_grad_(False)
    return student, Round(teacher_steps, student_steps, losses, wall)


def progressive_distill(unet: UNet2DConditionModel, scheduler: DDIMScheduler, data: TrainingSet,
                        cfg: StepDistillParams, accelerator: Accelerator
                        ) -> list[tuple[UNet2DConditionModel, Round]]:
    """Halve the steps from cfg.teacher_steps to cfg.student_steps; every round's student and losses.

    Round k's teacher is round k-1's student (the first round's is `unet`, left unchanged). Only the
    first round's teacher is guided: its student already reproduces the guided sampler in one pass, and
    guiding it again would compound the guidance.
    """
    scheduler = student_scheduler(scheduler)
    rounds = []
    teacher, steps = unet, cfg.teacher_steps
    while steps > cfg.student_steps:
        if rounds:
            guidance_scale, train_steps = 1.0, cfg.train_steps_per_round
        else:
            guidance_scale, train_steps = cfg.guidance_scale, cfg.first_round_steps
        teacher, result = distill_round(teacher, scheduler, data, steps, guidance_scale, train_steps, cfg,
                                        cfg.seed + len(rounds), accelerator)
        rounds.append((teacher, result))
        steps //= 2
    return rounds
