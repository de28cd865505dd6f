"""Typed mirror of `params.yaml`.

Every section is a pydantic model with `extra="forbid"`, so a mistyped key is an error that names the
key before any work starts. One loader (`load_params`) reads the YAML; stages take their own section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitParams(Section):
    validation: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.1, gt=0, lt=0.5)


class PrepareParams(Section):
    seed: int = 0
    source: Literal["digits", "folder"] = "digits"
    # A user folder of images plus `captions.csv` (columns: file, caption[, digit, style, color]).
    folder: str | None = None
    resolution: int = Field(16, ge=8, le=512)
    styles: list[str] = ["plain", "bold", "thin", "italic"]
    colors: list[str] = ["red", "green", "blue", "yellow"]
    variants_per_image: int = Field(4, ge=1, le=64)
    # Keep only this many source digits (None: all 1,797); tiny configs for tests.
    max_images: int | None = Field(None, ge=20)
    split: SplitParams = SplitParams()

    @model_validator(mode="after")
    def _folder_needs_path(self) -> PrepareParams:
        if self.source == "folder" and not self.folder:
            raise ValueError("prepare.source is 'folder' but prepare.folder is empty: set prepare.folder "
                             "to a directory holding images and captions.csv")
        return self


class EvaluatorParams(Section):
    seed: int = 0
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, ge=4)
    feature_dim: int = Field(64, ge=8)


class VaeParams(Section):
    channels: list[int] = Field([32, 64], min_length=1)
    latent_channels: int = Field(4, ge=1)
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    steps: int = Field(600, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)


class UnetParams(Section):
    channels: list[int] = Field([64, 128], min_length=1)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    # Also feed an attention-pooled caption into the time embedding (diffusers' addition_embed_type
    # "text"): every block then sees the caption, not only the cross-attention layers.
    text_time_embedding: bool = True


class TrainParams(Section):
    steps: int = Field(1500, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    cfg_dropout: float = Field(0.1, ge=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    # Min-SNR loss weighting (Hang et al. 2023); None weighs every timestep alike.
    snr_gamma: float | None = Field(5.0, gt=0)
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> TrainParams:
        if self.steps and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps}); "
                             "lower it")
        return self


class SampleParams(Section):
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(4.0, ge=1)
    eval_images: int = Field(320, ge=8)
    batch_size: int = Field(64, ge=1)


class TeacherParams(Section):
    seed: int = 0
    # A local Stable-Diffusion-format folder; None trains the embedded default from scratch.
    checkpoint: str | None = None
    # With a checkpoint: fine-tune its UNet on the prepared data, or pass it through unchanged.
    mode: Literal["train", "finetune", "passthrough"] = "train"
    # A local Hugging Face text encoder folder; None uses the packaged all-MiniLM-L6-v2.
    text_encoder: str | None = None
    max_caption_tokens: int = Field(16, ge=4, le=512)
    vae: VaeParams = VaeParams()
    unet: UnetParams = UnetParams()
    train: TrainParams = TrainParams()
    sample: SampleParams = SampleParams()

    @model_validator(mode="after")
    def _mode_matches_checkpoint(self) -> TeacherParams:
        if self.checkpoint is None and self.mode != "train":
            raise ValueError(f"teacher.mode is '{self.mode}' but teacher.checkpoint is empty: set "
                             "teacher.checkpoint to a local Stable Diffusion folder, or mode to 'train'")
        if self.checkpoint is not None and self.mode == "train":
            raise ValueError("teacher.checkpoint is set but teacher.mode is 'train': use 'finetune' or "
                             "'passthrough' with a checkpoint, or remove teacher.checkpoint")
        if self.checkpoint is not None and self.text_encoder is not None:
            raise ValueError("teacher.text_encoder is set together with teacher.checkpoint: a checkpoint "
                             "brings its own text encoder; remove teacher.text_encoder")
        return self


class Params(Section):
    prepare: PrepareParams = PrepareParams()
    evaluator: EvaluatorParams = EvaluatorParams()
    teacher: TeacherParams = TeacherParams()


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; remove it or fix its spelling")
        else:
            lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project root, where params.yaml lives")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of stage name to parameters")
    return parse_params(raw, str(path))
