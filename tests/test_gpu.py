"""On a CUDA machine: the same stage code trains and samples on the GPU through accelerate.

CI has no GPU, so these skip there; run them on a lent GPU machine with `pytest tests/test_gpu.py`.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from condenser.core.config import parse_params
from condenser.core.io import StagePaths
from tasks import step_distill, teacher
from tests.conftest import tiny_params

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_teacher_and_student_train_on_cuda_in_bf16(prepared_root: Path, tmp_path: Path):
    for name in ("prepare", "evaluator"):
        shutil.copytree(prepared_root / "data" / name, tmp_path / "data" / name)
    raw = tiny_params()
    raw["teacher"]["train"]["mixed_precision"] = "bf16"
    raw["step_distill"]["mixed_precision"] = "bf16"
    params = parse_params(raw)
    metrics = teacher.run(params.teacher, StagePaths(tmp_path))
    assert metrics["device"].startswith("cuda")
    assert json.loads((tmp_path / "data" / "teacher" / "manifest.json").read_text())["device"].startswith("cuda")
    distilled = step_distill.run(params.step_distill, StagePaths(tmp_path))
    assert distilled["device"].startswith("cuda")


def test_gan_trains_on_cuda_and_comes_back_to_the_cpu():
    from condenser.data.pairs import EditPairs
    from condenser.distill.lora import with_lora
    from condenser.models.editor import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig
    from condenser.train.gan import train_gan

    names = ("bold",)
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    pairs = EditPairs(images, -images, ["bold"] * 16, torch.zeros(16), torch.zeros(16), torch.zeros(16))
    generator = Generator(GeneratorConfig(names, channels=8, blocks=1, block="resnet", code_dim=8))
    discriminator = Discriminator(DiscriminatorConfig(names, channels=8))
    model = with_lora(generator, ["up1"], 2, train_codes=False)
    result = train_gan(model, discriminator, pairs, names, steps=5, batch_size=8, lr=1e-3, disc_lr=1e-3,
                       l1_weight=100.0, adv_weight=1.0, seed=0, accelerator=Accelerator(mixed_precision="bf16"))
    assert len(result.losses["g_l1"]) == 5 and all(math.isfinite(v) for v in result.losses["g_l1"])
    assert all(p.device.type == "cpu" for p in model.parameters())
