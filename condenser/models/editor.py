"""The on-device editor: an image-to-image GAN distilled from the teacher's img2img edits.

Method: "Distilling GANs from diffusion models for real-time on-device editing" (E2GAN). A base
generator (pix2pix-style U-Net encoder-decoder, optionally with CAT's inception residual blocks) and a
conditional patch discriminator learn the pooled (source, edit) pairs of several base concepts with
L1 + adversarial loss. Each concept then gets a LoRA (peft) on the generator's crucial layers only,
instead of a new GAN.

How the concept is chosen: a learned concept code per concept, applied by FiLM (scale and shift) in
every residual block. One code table shares all the generator's weights across concepts (the pooled
training makes its features general), costs 32 numbers per concept, and gives a new concept an obvious
starting point: a new code, initialised at the mean of the base codes, trained with the LoRA. A
per-concept output head would instead leave a new concept with an untrained head. The exported editor
fixes its concept (`GeneratorConfig.default`), so on device it takes an image and nothing else.

This module holds the networks and their files; training is condenser.train.gan, the LoRA and its
search condenser.distill.lora.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

GENERATOR_WEIGHTS, GENERATOR_CONFIG = "generator.safetensors", "generator_config.json"
DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_CONFIG = "discriminator.safetensors", "discriminator_config.json"
# "inception": CAT's inception-based residual blocks.
Block = Literal["resnet", "inception"]


@dataclass(frozen=True)
class GeneratorConfig:
    """The generator's architecture, saved beside its weights. Sizes have no defaults here: their one
    default is gan_base.generator in params (condenser.core.config.GeneratorParams)."""

    concepts: tuple[str, ...]
    channels: int
    blocks: int
    block: Block
    code_dim: int
    groups: int = 8
    # The concept used when forward() is given none: set on an exported single-concept editor.
    default: str | None = None

    def __post_init__(self):
        if self.block not in get_args(Block):
            raise ValueError(f"generator block '{self.block}' is not one of {', '.join(get_args(Block))}")
        if self.default is not None and self.default not in self.concepts:
            raise ValueError(f"generator default concept '{self.default}' is not one of {self.concepts}")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: the editor runs at batch 1 on device, where batch statistics mean nothing.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class FiLMBlock(nn.Module):
    """Pre-activation residual block whose middle activation is scaled and shifted by the concept code."""

    def __init__(self, channels: int, code_dim: int, groups: int, kind: Block):
        super().__init__()
        self.norm1 = _norm(channels, groups)
        if kind == "inception":
            # CAT's inception residual block: parallel 1x1, 3x3 and dilated 3x3 branches, so each block
            # mixes several receptive fields at the cost of one 3x3 conv.
            self.branch1 = nn.Conv2d(channels, channels // 2, 1)
            self.branch3 = nn.Conv2d(channels, channels // 4, 3, padding=1)
            self.branch5 = nn.Conv2d(channels, channels - channels // 2 - channels // 4, 3, padding=2,
                                     dilation=2)
        else:
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.kind = kind
        self.norm2 = _norm(channels, groups)
        self.film = nn.Linear(code_dim, 2 * channels)
        self.conv2 = nn.Conv2d(channels, channels, 3 if kind == "resnet" else 1, padding=1 if kind == "resnet" else 0)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(x))
        if self.kind == "inception":
            h = torch.cat([self.branch1(h), self.branch3(h), self.branch5(h)], 1)
        else:
            h = self.conv1(h)
        gamma, beta = self.film(code)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + gamma) + beta
        return x + self.conv2(F.relu(h))


class Generator(nn.Module):
    """U-Net encoder-decoder (two stride-2 levels, FiLM residual blocks at the bottom) predicting a residual:
    edit = source + G(source), in [-1, 1]. The output conv starts at zero, so an untrained generator is
    the identity edit, a good start for edits that keep most of the image."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        c, g = config.channels, config.groups
        self.codes = nn.Embedding(len(config.concepts), config.code_dim)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.down1 = nn.Conv2d(c, 2 * c, 4, stride=2, padding=1)
        self.down2 = nn.Conv2d(2 * c, 4 * c, 4, stride=2, padding=1)
        self.norm_d1, self.norm_d2 = _norm(2 * c, g), _norm(4 * c, g)
        self.blocks = nn.ModuleList(FiLMBlock(4 * c, config.code_dim, g, config.block) for _ in range(config.blocks))
        self.up1 = nn.Conv2d(4 * c + 2 * c, 2 * c, 3, padding=1)
        self.up2 = nn.Conv2d(2 * c + c, c, 3, padding=1)
        self.norm_u1, self.norm_u2 = _norm(2 * c, g), _norm(c, g)
        self.out = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def concept_index(self, concept: str | None) -> int:
        name = concept or self.config.default
        if name not in self.config.concepts:
            raise KeyError(f"the generator knows concepts {list(self.config.concepts)}, not {name!r}")
        return self.config.concepts.index(name)

    def forward(self, x: torch.Tensor, concept: torch.Tensor | None = None) -> torch.Tensor:
        """Edit images x in [-1, 1] [N, 3, H, W] (H, W divisible by 4); `concept`: indices [N] or None
        for the config's default concept."""
        if concept is None:
            concept = torch.full((x.shape[0],), self.concept_index(None), dtype=torch.long, device=x.device)
        code = self.codes(concept)
        s = F.relu(self.stem(x))
        d1 = F.relu(self.norm_d1(self.down1(s)))
        h = F.relu(self.norm_d2(self.down2(d1)))
        for block in self.blocks:
            h = block(h, code)
        h = F.relu(self.norm_u1(self.up1(torch.cat([F.interpolate(h, scale_factor=2.0), d1], 1))))
        h = F.relu(self.norm_u2(self.up2(torch.cat([F.interpolate(h, scale_factor=2.0), s], 1))))
        return x + self.out(h)


@dataclass(frozen=True)
class DiscriminatorConfig:
    concepts: tuple[str, ...]
    channels: int = 32


class Discriminator(nn.Module):
    """Conditional PatchGAN on (source, edit) with a projection of the concept (Miyato & Koyama 2018):
    it judges whether each patch is a plausible edit of that source for that concept."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        d = config.channels
        sn = nn.utils.parametrizations.spectral_norm
        self.body = nn.Sequential(sn(nn.Conv2d(6, d, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
                                  sn(nn.Conv2d(d, 2 * d, 4, stride=2, padding=1)), nn.LeakyReLU(0.2))
        self.head = sn(nn.Conv2d(2 * d, 1, 3, padding=1))
        self.embed = nn.Embedding(len(config.concepts), 2 * d)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, source: torch.Tensor, edit: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        h = self.body(torch.cat([source, edit], 1))
        return self.head(h) + (self.embed(concept)[:, :, None, None] * h).sum(1, keepdim=True)


def with_concept(model: Generator | Discriminator, concept: str) -> Generator | Discriminator:
    """A copy that knows `concept` too; a new concept's embedding starts at the mean of the others."""
    model = copy.deepcopy(model)
    if concept in model.config.concepts:
        return model
    table = model.codes if isinstance(model, Generator) else model.embed
    grown = nn.Embedding(table.num_embeddings + 1, table.embedding_dim)
    with torch.no_grad():
        grown.weight[:-1] = table.weight
        grown.weight[-1] = table.weight.mean(0)
    if isinstance(model, Generator):
        model.codes = grown
    else:
        model.embed = grown
    model.config = replace(model.config, concepts=(*model.config.concepts, concept))
    return model


def save_model(model: Generator | Discriminator, out_dir: Path) -> None:
    weights, config = ((GENERATOR_WEIGHTS, GENERATOR_CONFIG) if isinstance(model, Generator)
                       else (DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_CONFIG))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out_dir / weights))
    (out_dir / config).write_text(json.dumps(asdict(model.config), indent=2, sort_keys=True) + "\n")


def load_generator(folder: Path) -> Generator:
    return _load(Path(folder), Generator, GeneratorConfig, GENERATOR_WEIGHTS, GENERATOR_CONFIG)


def load_discriminator(folder: Path) -> Discriminator:
    return _load(Path(folder), Discriminator, DiscriminatorConfig, DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_CONFIG)


def _load(folder: Path, cls, config_cls, weights: str, config: str):
    for p in (folder / config, folder / weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; run the gan_base stage first (dvc repro -s gan_base), or "
                                    "point at a folder saved by condenser.models.editor.save_model")
    raw = json.loads((folder / config).read_text())
    model = cls(config_cls(**{**raw, "concepts": tuple(raw["concepts"])}))
    model.load_state_dict(load_file(str(folder / weights)))
    return model.eval()


@torch.no_grad()
def edit_images(generator: nn.Module, sources: torch.Tensor, concept: str, names: tuple[str, ...],
                batch_size: int = 256) -> torch.Tensor:
    """The generator's edits of sources in [-1, 1], returned in [0, 1] (clamped, like the device output)."""
    generator.eval()
    c = torch.full((batch_size,), names.index(concept), dtype=torch.long)
    out = [generator(sources[s:s + batch_size], c[:len(sources[s:s + batch_size])])
           for s in range(0, len(sources), batch_size)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)
