"""Image grids for people to look at (PNG under `plots/`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, scale: int = 4) -> None:
    """Save images ([N, 3, H, W], uint8 or float in [0, 1]) as one PNG grid, upscaled `scale` times."""
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    pad = torch.zeros(nrows * ncol - n, c, h, w, dtype=torch.uint8)
    grid = torch.cat([images, pad]).view(nrows, ncol, c, h, w).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(nrows * h, ncol * w, c)
    if scale > 1:
        grid = F.interpolate(grid.permute(2, 0, 1)[None].float(), scale_factor=scale, mode="nearest")
        grid = grid[0].permute(1, 2, 0).to(torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid.numpy())).save(path)
