"""Training the judge: a one-cycle schedule and a light augmentation, on real labelled images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from condenser.models.judge import HEADS, Judge, JudgeConfig, batches


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
        for s in batches(len(images), batch_size):
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
