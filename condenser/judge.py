"""The judge: a small classifier of digit, style and colour, and the metrics built on it.

It plays the role FID's Inception network and CLIP play for Stable Diffusion: its penultimate features
give a Fréchet distance (FD) between generated and real images, and its predictions give the prompt
accuracy of generated images (does the image show the digit, style and colour the caption asked for).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import linalg
from torch import nn
from tqdm.auto import tqdm

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


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def predict(judge: Judge, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    judge.eval()
    out = {h: [] for h in HEADS}
    for s in _batches(len(images), batch_size):
        for h, logits in judge(images[s]).items():
            out[h].append(logits.argmax(1))
    return {h: torch.cat(v) for h, v in out.items()}


@torch.no_grad()
def features(judge: Judge, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    judge.eval()
    return torch.cat([judge.features(images[s]) for s in _batches(len(images), batch_size)]).double().numpy()


def accuracy(judge: Judge, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy of the judge on images in [0, 1]; labels of -1 (unknown) are skipped.

    For generated images, `labels` are what the captions asked for: this is the prompt accuracy.
    """
    pred = predict(judge, images)
    result = {}
    for h in HEADS:
        known = labels[h] >= 0
        if known.any():
            result[h] = float((pred[h][known] == labels[h][known]).float().mean())
    return result


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the formula of FID)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    with warnings.catch_warnings():
        # Dead ReLU/GELU features make the product singular; the trace below is still well defined.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # A singular product: nudge both covariances, as the reference FID code does.
        eps = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean), 0.0))


def fd(judge: Judge, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """FD between two image sets in [0, 1] on the judge's penultimate features."""
    return frechet_distance(features(judge, images_a), features(judge, images_b))


def train_judge(images: torch.Tensor, labels: dict[str, torch.Tensor], config: JudgeConfig, epochs: int,
                batch_size: int, lr: float, seed: int) -> Judge:
    """Train on images in [0, 1] with all three labels known; one-cycle schedule, light augmentation."""
    torch.manual_seed(seed)
    judge = Judge(config)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    judge.train()
    for _ in tqdm(range(epochs), desc="evaluator: training judge", unit="epoch"):
        order = torch.randperm(len(images), generator=gen)
        for s in _batches(len(images), batch_size):
            idx = order[s]
            x = images[idx]
            # A one-pixel random shift: generated digits are not centred exactly like the scans.
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            logits = judge(x)
            loss = sum(F.cross_entropy(logits[h], labels[h][idx]) for h in HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    judge.eval()
    return judge


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
