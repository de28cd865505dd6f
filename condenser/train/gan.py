"""Training the editor GAN: the pix2pix objective on (source, teacher edit) pairs, through accelerate.

gan_base trains the base generator this way on the pooled pairs of its concepts, and writes the
objective and the pair split it used (`training.json`, `GanObjective`); lora fine-tunes with the same
objective on the same split, so the pairs it selects ranks on were never seen by the base either.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from condenser.core.io import read_json, write_json
from condenser.data.pairs import EditPairs
from condenser.models.editor import Discriminator

OBJECTIVE_FILE = "training.json"


@dataclass(frozen=True)
class GanObjective:
    """The base GAN's loss weights, pair split and concepts: what a fine-tune must reuse."""

    l1_weight: float
    adv_weight: float
    validation_fraction: float
    seed: int
    concepts: list[str]
    resolution: int

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / OBJECTIVE_FILE, asdict(self))

    @classmethod
    def load(cls, gan_dir: Path) -> GanObjective:
        path = Path(gan_dir) / OBJECTIVE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the gan_base stage first (dvc repro gan_base)")
        return cls(**read_json(path))


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
