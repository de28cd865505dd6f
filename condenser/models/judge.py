"""The judge: a small classifier of digit, style and colour.

It plays the role FID's Inception network and CLIP play for Stable Diffusion: its penultimate features
give a Fréchet distance (FD) between generated and real images, and its predictions give the prompt
accuracy of generated images (condenser.quality computes both). Training: condenser.train.judge.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

HEADS = ("digit", "style", "color")
# Every image is judged at this size, so one judge serves generators of any resolution.
JUDGE_RESOLUTION = 16


@dataclass(frozen=True)
class JudgeConfig:
    n_styles: int
    n_colors: int
    width: int = 32
    feature_dim: int = 64


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * (JUDGE_RESOLUTION // 4) ** 2, config.feature_dim), nn.GELU(),
        )
        self.heads = nn.ModuleDict({"digit": nn.Linear(config.feature_dim, 10),
                                    "style": nn.Linear(config.feature_dim, config.n_styles),
                                    "color": nn.Linear(config.feature_dim, config.n_colors)})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1], [N, 3, H, W]."""
        if images.shape[-2:] != (JUDGE_RESOLUTION, JUDGE_RESOLUTION):
            images = F.interpolate(images, size=(JUDGE_RESOLUTION, JUDGE_RESOLUTION), mode="area")
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}


def batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def predict(judge: Judge, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    judge.eval()
    out = {h: [] for h in HEADS}
    for s in batches(len(images), batch_size):
        for h, logits in judge(images[s]).items():
            out[h].append(logits.argmax(1))
    return {h: torch.cat(v) for h, v in out.items()}


@torch.no_grad()
def features(judge: Judge, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    judge.eval()
    return torch.cat([judge.features(images[s]) for s in batches(len(images), batch_size)]).double().numpy()


def save_judge(judge: Judge, out_dir: Path, **meta) -> None:
    out_dir = Path(out_dir)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out_dir / "judge.safetensors"))
    (out_dir / "judge_config.json").write_text(json.dumps({**asdict(judge.config), **meta}, indent=2,
                                                          sort_keys=True) + "\n")


def load_judge(judge_dir: Path) -> tuple[Judge, dict]:
    """Load a judge saved by the evaluator stage; returns it with its metadata (style/colour names)."""
    judge_dir = Path(judge_dir)
    config_file, weights = judge_dir / "judge_config.json", judge_dir / "judge.safetensors"
    for p in (config_file, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; run the evaluator stage first (dvc repro -s evaluator)")
    meta = json.loads(config_file.read_text())
    fields = {k: meta[k] for k in JudgeConfig.__dataclass_fields__}
    judge = Judge(JudgeConfig(**fields))
    judge.load_state_dict(load_file(str(weights)))
    return judge.eval(), meta
