"""Training the teacher: latent diffusion from scratch, or fine-tuning a checkpoint's UNet.

Follows latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): a VAE first, then the UNet on its scaled latents, with classifier-free guidance caption
dropout (Ho & Salimans 2022), v-prediction (Salimans & Ho 2022), Min-SNR loss weighting (Hang et al.
2023), EMA weights, warmup and a cosine schedule. `accelerate` runs the same loops on CPU, one GPU or
many.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from condenser.core.config import TrainParams, VaeParams
from condenser.models.teacher import Captions


@dataclass
class TrainResult:
    losses: list[float]
    wall_time_s: float

    @property
    def steps_per_s(self) -> float:
        return len(self.losses) / self.wall_time_s if self.wall_time_s > 0 else 0.0


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: VaeParams, seed: int,
              accelerator: Accelerator) -> TrainResult:
    """Fit the autoencoder to images in [-1, 1]: MSE reconstruction plus a small KL term."""
    set_seed(seed)
    vae.train().requires_grad_(True)
    model = _Reconstruction(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(50, cfg.steps // 10),
                          num_training_steps=max(cfg.steps, 1))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (cfg.batch_size, vae.config.latent_channels, images.shape[-2] // down,
                    images.shape[-1] // down)
    gen = torch.Generator().manual_seed(seed + accelerator.process_index)
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(cfg.steps), desc="teacher: training VAE", disable=not accelerator.is_main_process):
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)].to(accelerator.device)
        noise = torch.randn(latent_shape, generator=gen).to(accelerator.device)
        with accelerator.autocast():
            recon, kl = model(x, noise)
        loss = F.mse_loss(recon.float(), x) + cfg.kl_weight * kl.float()
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        losses.append(loss.item())
    wall = time.perf_counter() - start
    vae.eval().requires_grad_(False)
    return TrainResult(losses, wall)


class _Reconstruction(torch.nn.Module):
    """Encode, sample, decode in one forward, so a DDP wrapper sees (and syncs) the whole VAE step."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * noise).sample
        return recon, posterior.kl().mean()


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor) -> float:
    """1 / the std of sampled latents, so the UNet sees unit-variance inputs (SD's 0.18215, measured)."""
    return float(1.0 / (mean.var() + std.pow(2).mean()).sqrt())


def train_unet(unet: UNet2DConditionModel, scheduler: DDIMScheduler,
               latents: tuple[torch.Tensor, torch.Tensor], scaling_factor: float, captions: Captions,
               cfg: TrainParams, seed: int, accelerator: Accelerator) -> TrainResult:
    """Denoising training of the UNet on scaled latents; the EMA weights are copied in at the end.

    `latents` are the posterior (mean, std) of every training image; a fresh sample is drawn per step.
    The prediction type and timesteps are the scheduler's, so a checkpoint is fine-tuned the way it
    samples.
    """
    prediction_type = scheduler.config.prediction_type
    timesteps = scheduler.config.num_train_timesteps
    set_seed(seed)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # diffusers' plain "constant" ignores warmup; ours always warms up.
    schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    sched = get_scheduler(schedule, opt, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=max(cfg.steps, 1))
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=True)
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    device = accelerator.device
    ema.to(device)
    mean, std = latents
    embeddings = captions.embeddings.to(device)
    alphas = scheduler.alphas_cumprod.to(device)
    gen = torch.Generator().manual_seed(seed + accelerator.process_index)
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(cfg.steps), desc="teacher: training UNet", disable=not accelerator.is_main_process):
        idx = torch.randint(len(mean), (cfg.batch_size,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(timesteps, (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cfg_dropout
        rows = torch.where(drop, captions.unconditional, captions.index[idx])
        z, noise, t, rows = z.to(device), noise.to(device), t.to(device), rows.to(device)
        noisy = scheduler.add_noise(z, noise, t)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
        with accelerator.autocast():
            pred = unet(noisy, t, encoder_hidden_states=embeddings[rows]).sample
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma is not None:
            snr = alphas[t] / (1 - alphas[t])
            weight = snr.clamp(max=cfg.snr_gamma)
            # Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (same per-x0 weight).
            per_sample = per_sample * weight / (snr if prediction_type == "epsilon" else snr + 1)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        ema.step(accelerator.unwrap_model(unet).parameters())
        losses.append(loss.item())
    wall = time.perf_counter() - start
    unet = accelerator.unwrap_model(unet)
    if cfg.steps:
        ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    return TrainResult(losses, wall)
