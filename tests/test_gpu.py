"""On a CUDA machine: the same stage code trains and samples on the GPU through accelerate.

CI has no GPU, so these skip there; run them on a lent GPU machine with `pytest tests/test_gpu.py`.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from condenser.config import parse_params
from condenser.io import StagePaths
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
