"""The on-device editor: an image-to-image GAN distilled from the teacher's img2img edits.

Method: "Distilling GANs from diffusion models for real-time on-device editing" (METHODS.md). A base
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
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

GENERATOR_WEIGHTS, GENERATOR_CONFIG = "generator.safetensors", "generator_config.json"
DISCRIMINATOR_WEIGHTS, DISCRIMINATOR_CONFIG = "discriminator.safetensors", "discriminator_config.json"
# gan_base's objective and pair split, which lora reuses.
TRAINING_FILE = "training.json"


# --- models ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratorConfig:
    concepts: tuple[str, ...]
    channels: int = 32
    blocks: int = 4
    block: str = "resnet"  # or "inception" (CAT)
    code_dim: int = 32
    groups: int = 8
    # The concept used when forward() is given none: set on an exported single-concept editor.
    default: str | None = None


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: the editor runs at batch 1 on device, where batch statistics mean nothing.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class FiLMBlock(nn.Module):
    """Pre-activation residual block whose middle activation is scaled and shifted by the concept code."""

    def __init__(self, channels: int, code_dim: int, groups: int, kind: str):
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


def parameter_count(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


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
                                    "point at a folder saved by condenser.editor.save_model")
    raw = json.loads((folder / config).read_text())
    model = cls(config_cls(**{**raw, "concepts": tuple(raw["concepts"])}))
    model.load_state_dict(load_file(str(folder / weights)))
    return model.eval()


# --- data ------------------------------------------------------------------------------------------

@dataclass
class EditPairs:
    """Sources and teacher edits in [-1, 1] [N, 3, H, W], each with its concept's name."""

    sources: torch.Tensor
    edits: torch.Tensor
    concepts: list[str]
    digit: torch.Tensor
    target_style: torch.Tensor
    target_color: torch.Tensor

    def __len__(self) -> int:
        return len(self.concepts)

    def subset(self, index) -> EditPairs:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return EditPairs(self.sources[idx], self.edits[idx], [self.concepts[i] for i in idx.tolist()],
                         self.digit[idx], self.target_style[idx], self.target_color[idx])

    @staticmethod
    def cat(parts: list[EditPairs]) -> EditPairs:
        return EditPairs(*(torch.cat([getattr(p, f) for p in parts]) for f in ("sources", "edits")),
                         [c for p in parts for c in p.concepts],
                         *(torch.cat([getattr(p, f) for p in parts]) for f in ("digit", "target_style",
                                                                                "target_color")))


def load_pairs(concept_dir: Path, concept: str, file: str = "pairs.safetensors") -> EditPairs:
    """One concept's pairs as distill_data wrote them (`pairs.safetensors` or `heldout.safetensors`)."""
    path = Path(concept_dir) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run distill_data for concept '{concept}' first "
                                f"(dvc repro distill_data@{concept})")
    t = load_file(str(path))
    to_signed = lambda x: x.float() / 127.5 - 1  # noqa: E731
    return EditPairs(to_signed(t["sources"]), to_signed(t["edits"]), [concept] * len(t["sources"]), t["digit"],
                     t["target_style"], t["target_color"])


def split_pairs(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of a concept's pairs. gan_base and lora split alike, so the pairs lora
    selects ranks on were never seen by the base either."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * validation_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def data_fraction(train_idx: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first `fraction` of a seeded order: smaller fractions are subsets of larger ones."""
    order = np.random.default_rng(seed + 1).permutation(train_idx)
    return np.sort(order[:max(2, math.ceil(len(order) * fraction))])


# --- training --------------------------------------------------------------------------------------

@dataclass
class GanTrainResult:
    losses: dict[str, list[float]] = field(default_factory=lambda: {"g_l1": [], "g_adv": [], "d": []})
    wall_time_s: float = 0.0


def train_gan(generator: nn.Module, discriminator: Discriminator, pairs: EditPairs, concept_names: tuple[str, ...],
              steps: int, batch_size: int, lr: float, disc_lr: float, l1_weight: float, adv_weight: float,
              seed: int, accelerator: Accelerator | None = None, desc: str = "training GAN") -> GanTrainResult:
    """pix2pix objective: LSGAN adversarial loss + l1_weight x L1 to the teacher's edit.

    Only the generator's parameters with requires_grad train (all of them, or a LoRA's); the
    discriminator always trains fully: it is not shipped, so its size costs nothing on device.
    """
    accelerator = accelerator or Accelerator()
    set_seed(seed)
    params = [p for p in generator.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=disc_lr, betas=(0.5, 0.999))
    generator.train()
    discriminator.train()
    generator, discriminator, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    device = accelerator.device
    concept_ids = torch.tensor([concept_names.index(c) for c in pairs.concepts])
    gen = torch.Generator().manual_seed(seed)
    result = GanTrainResult()
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False, disable=not accelerator.is_main_process):
        idx = torch.randint(len(pairs), (min(batch_size, len(pairs)),), generator=gen)
        src, tgt, c = pairs.sources[idx].to(device), pairs.edits[idx].to(device), concept_ids[idx].to(device)
        with accelerator.autocast():
            fake = generator(src, c)
            real_logits, fake_logits = discriminator(src, tgt, c), discriminator(src, fake.detach(), c)
        loss_d = 0.5 * (F.mse_loss(real_logits.float(), torch.ones_like(real_logits.float()))
                        + F.mse_loss(fake_logits.float(), torch.zeros_like(fake_logits.float())))
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        opt_d.step()
        with accelerator.autocast():
            adv_logits = discriminator(src, fake, c).float()
        loss_adv = F.mse_loss(adv_logits, torch.ones_like(adv_logits))
        loss_l1 = F.l1_loss(fake.float(), tgt)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(adv_weight * loss_adv + l1_weight * loss_l1)
        opt_g.step()
        result.losses["g_l1"].append(loss_l1.item())
        result.losses["g_adv"].append(loss_adv.item())
        result.losses["d"].append(loss_d.item())
    result.wall_time_s = time.perf_counter() - start
    # Back on the CPU in eval mode: scoring, merging and export run there, as on the device.
    accelerator.unwrap_model(generator).cpu().eval()
    accelerator.unwrap_model(discriminator).cpu().eval()
    return result


# --- crucial layers and LoRA ----------------------------------------------------------------------

def adaptable_layers(generator: Generator) -> list[str]:
    """Names of the generator's layers LoRA can wrap: every conv and the FiLM linears."""
    return [name for name, m in generator.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_change(before: nn.Module, after: nn.Module) -> list[dict]:
    """Per adaptable layer, how far a fine-tune moved its weight: ||W_after - W_before|| / ||W_before||,
    largest first. The layers that move most are the ones the new concept needs (the crucial layers)."""
    old = dict(before.named_modules())
    rows = []
    for name in adaptable_layers(before):
        w0, w1 = old[name].weight.detach(), dict(after.named_modules())[name].weight.detach()
        rows.append({"layer": name, "relative_change": float((w1 - w0).norm() / w0.norm().clamp_min(1e-12)),
                     "params": old[name].weight.numel() + (old[name].bias.numel() if old[name].bias is not None else 0)})
    return sorted(rows, key=lambda r: -r["relative_change"])


def with_lora(generator: Generator, layers: list[str], rank: int, train_codes: bool):
    """A peft LoRA model of a copy of `generator`, on `layers` only; `train_codes` also trains the concept
    code table (a new concept's code must be learned)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(layers),
                        modules_to_save=["codes"] if train_codes else None, init_lora_weights=True)
    return get_peft_model(copy.deepcopy(generator), config)


def adapter_parameters(peft_model) -> int:
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def merged(peft_model, concept: str) -> Generator:
    """The LoRA folded into the weights (`merge_and_unload`): a plain Generator whose default concept is
    `concept`, ready for export."""
    generator = copy.deepcopy(peft_model).merge_and_unload()
    generator.config = replace(generator.config, default=concept)
    return generator.eval()


# --- metrics ---------------------------------------------------------------------------------------

@torch.no_grad()
def edit_images(generator: nn.Module, sources: torch.Tensor, concept: str, names: tuple[str, ...],
                batch_size: int = 256) -> torch.Tensor:
    """The generator's edits of sources in [-1, 1], returned in [0, 1] (clamped, like the device output)."""
    generator.eval()
    c = torch.full((batch_size,), names.index(concept), dtype=torch.long)
    out = [generator(sources[s:s + batch_size], c[:len(sources[s:s + batch_size])])
           for s in range(0, len(sources), batch_size)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [0, 1]."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of images in [0, 1], Gaussian window, per channel, valid region only.
    A 7-pixel window (scikit-image's default) because the images are as small as 16x16."""
    a, b = a.double(), b.double()
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g[:, None] * g[None, :]) / g.sum() ** 2
    k = g.expand(a.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(t, k, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


@torch.no_grad()
def latency_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def edit_quality(edits: torch.Tensor, pairs: EditPairs, judge, head: str) -> dict:
    """Edits [0, 1] against the teacher's edits of the same sources: PSNR, SSIM, and the judge's concept
    accuracy (the target attribute shows) and content preservation (the digit is kept)."""
    from condenser.judge import predict

    teacher = (pairs.edits + 1) / 2
    judged = predict(judge, edits)
    target = pairs.target_style if head == "style" else pairs.target_color
    return {"psnr": psnr(edits, teacher), "ssim": ssim(edits, teacher),
            "concept_accuracy": float((judged[head] == target).float().mean()),
            "content_preservation": float((judged["digit"] == pairs.digit).float().mean())}


def concept_settings(concept_dir: Path) -> dict:
    """How distill_data made a concept's pairs (from its manifest): the judge head it edits, and the
    teacher's img2img settings (steps, strength, guidance, prompt) the GAN is timed against."""
    manifest = Path(concept_dir) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: missing; run distill_data for this concept first")
    params = json.loads(manifest.read_text())["params"]
    return {"head": "style" if params.get("style") is not None else "color", "steps": params["steps"],
            "strength": params["strength"], "guidance_scale": params["guidance_scale"], "prompt": params["prompt"]}


def export_onnx(generator: Generator, path: Path, resolution: int) -> None:
    """The single-concept editor as ONNX (image in, edited image out, both in [-1, 1]; batch is dynamic)."""
    import warnings

    example = torch.zeros(1, 3, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(generator.eval(), (example,), str(path), input_names=["image"], output_names=["edit"],
                          dynamic_axes={"image": {0: "batch"}, "edit": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def load_training(gan_dir: Path) -> dict:
    """The base GAN's objective and split (training.json), for fine-tuning it the same way."""
    path = Path(gan_dir) / TRAINING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the gan_base stage first (dvc repro gan_base)")
    return json.loads(path.read_text())
