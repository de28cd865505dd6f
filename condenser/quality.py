"""Quality metrics, each computed the same way wherever a model is scored.

- Generated images against real ones: FD (the Fréchet distance of FID, on the judge's features) and
  prompt accuracy (the judge's verdict per head against what the caption asked for; CLIP score's role).
- Edited images against the teacher's edits: PSNR, SSIM, and the judge's concept accuracy (the edited
  attribute shows) and content preservation (the digit is kept).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from condenser.data.pairs import EditPairs
from condenser.models.judge import HEADS, Judge, features, predict


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


def edit_quality(edits: torch.Tensor, pairs: EditPairs, judge, head: str) -> dict:
    """Edits [0, 1] against the teacher's edits of the same sources: PSNR, SSIM, and the judge's concept
    accuracy (the target attribute shows) and content preservation (the digit is kept)."""
    teacher = (pairs.edits + 1) / 2
    judged = predict(judge, edits)
    target = pairs.target_style if head == "style" else pairs.target_color
    return {"psnr": psnr(edits, teacher), "ssim": ssim(edits, teacher),
            "concept_accuracy": float((judged[head] == target).float().mean()),
            "content_preservation": float((judged["digit"] == pairs.digit).float().mean())}
