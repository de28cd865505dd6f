"""step_distill: the DDIM arithmetic is the sampler's, a round halves the steps and lowers its loss, the
student folder loads and samples unguided at its step count, and the stage writes its outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_params
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from condenser.core.config import ConfigError, parse_params
from condenser.core.io import StagePaths, read_json
from condenser.data.images import load_split
from condenser.distill import step_distill as SD
from condenser.models import teacher as T
from tasks import step_distill as stage

CAPTIONS = ["a bold red handwritten seven", "a thin blue handwritten two"]


def _cfg(**overrides):
    # TINY_PARAMS runs two rounds (8 -> 4 -> 2 steps), so an intermediate student is kept and scored.
    params = tiny_params()
    params["step_distill"].update(overrides)
    return parse_params(params).step_distill


@pytest.fixture(scope="module")
def teacher(teacher_root) -> StableDiffusionPipeline:
    return T.load_checkpoint(teacher_root / "data" / "teacher")


@pytest.fixture(scope="module")
def distilled_root(teacher_root) -> Path:
    stage.run(_cfg(), StagePaths(teacher_root))
    return teacher_root


def _embeddings(pipe, captions):
    cond, uncond = pipe.encode_prompt(captions, "cpu", 1, True)
    return cond, uncond


def _noise(n: int, pipe) -> torch.Tensor:
    size = pipe.unet.config.sample_size
    return torch.cat([torch.randn(1, pipe.unet.config.in_channels, size, size,
                                  generator=torch.Generator().manual_seed(i)) for i in range(n)])


def test_ddim_arithmetic_is_the_pipeline_sampler(teacher):
    """Steps chained with the library's arithmetic reproduce the pipeline's guided DDIM latents."""
    scheduler = SD.student_scheduler(teacher.scheduler)
    pipe = StableDiffusionPipeline(**{**teacher.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = 8, 3.0
    generators = [torch.Generator().manual_seed(i) for i in range(len(CAPTIONS))]
    expected = pipe(CAPTIONS, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    output_type="latent").images
    cond, uncond = _embeddings(pipe, CAPTIONS)
    z = _noise(len(CAPTIONS), pipe).double()
    grid = copy.deepcopy(scheduler)
    grid.set_timesteps(steps)
    for t in grid.timesteps:
        t = t.repeat(len(CAPTIONS))
        out = SD.guided_output(pipe.unet, z.float(), t, cond, uncond, guidance).double()
        x0, eps = SD.to_x0_eps(out, z, SD.alpha_bar(scheduler, t), scheduler.config.prediction_type)
        z = SD.ddim_step(x0, eps, SD.alpha_bar(scheduler, t - SD.step_size(scheduler, steps)))
    torch.testing.assert_close(z.float(), expected, atol=1e-5, rtol=1e-4)


def test_target_makes_one_step_land_where_two_teacher_steps_land(teacher):
    scheduler = SD.student_scheduler(teacher.scheduler)
    cond, uncond = _embeddings(teacher, CAPTIONS)
    z = _noise(len(CAPTIONS), teacher)
    # The last 4-step timestep: its destination is the scheduler's final alpha.
    t = torch.tensor([999, 249])
    accelerator = Accelerator(cpu=True)
    x0 = SD.two_step_target(teacher.unet, scheduler, z, t, cond, uncond, 8, 3.0, accelerator)
    landed = z
    for start in (t, t - SD.step_size(scheduler, 8)):
        out = SD.guided_output(teacher.unet, landed, start, cond, uncond, 3.0)
        pair = SD.to_x0_eps(out, landed, SD.alpha_bar(scheduler, start).float(), "v_prediction")
        landed = SD.ddim_step(*pair, SD.alpha_bar(scheduler, start - SD.step_size(scheduler, 8)).float())
    a_t, a_end = (SD.alpha_bar(scheduler, s).float() for s in (t, t - SD.step_size(scheduler, 4)))
    one_step = SD.ddim_step(x0, (z - a_t.sqrt() * x0) / (1 - a_t).sqrt(), a_end)
    torch.testing.assert_close(one_step, landed, atol=1e-4, rtol=1e-4)


def test_round_halves_the_steps_and_lowers_the_loss(teacher, teacher_root):
    cfg = _cfg(batch_size=16, lr=2e-3, warmup_steps=2, lr_schedule="constant")
    train = load_split(teacher_root / "data" / "prepare", "train")
    mean, std = T.encode_latents(teacher.vae, train.float_images() * 2 - 1)
    data = SD.TrainingSet(mean, std, teacher.vae.config.scaling_factor,
                          T.encode_captions(teacher.text_encoder, teacher.tokenizer, train.captions))
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    scheduler = SD.student_scheduler(teacher.scheduler)
    student, result = SD.distill_round(teacher.unet, scheduler, data, 4, cfg.guidance_scale, 40, cfg, cfg.seed,
                                      Accelerator(cpu=True))
    assert (result.teacher_steps, result.student_steps) == (4, 2)
    assert len(result.losses) == 40
    start, end = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert end < 0.8 * start, (start, end)
    # The teacher stays as it was; the student is a trained copy.
    assert all(torch.equal(before[k], v) for k, v in teacher.unet.state_dict().items())
    assert student is not teacher.unet
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_stage_writes_student_manifest_metrics_and_plots(distilled_root):
    out = distilled_root / "data" / "step_distill"
    cfg = _cfg()
    for part in T.PIPELINE_PARTS:
        assert (out / part).exists(), part
    assert list((out / "student_4" / "unet").glob("*.safetensors"))
    sampling = read_json(out / SD.SAMPLING_FILE)
    assert sampling["num_inference_steps"] == 2 and sampling["guidance_scale"] == 1.0
    manifest = read_json(out / "manifest.json")
    assert set(manifest["inputs"]) == {"data/prepare", "data/evaluator", "data/teacher"}
    assert manifest["params"] == cfg.model_dump() and manifest["sampling"] == sampling
    metrics = read_json(distilled_root / "metrics" / "step_distill.json")
    models = metrics["models"]
    assert set(models) == {"teacher_8", "teacher_2", "student_4", "student_2"}
    # Counted, not assumed: CFG costs two UNet evaluations per step, the students one.
    assert [models[k]["unet_evals_per_image"] for k in ("teacher_8", "teacher_2", "student_4", "student_2")] \
        == [16, 4, 4, 2]
    for m in models.values():
        assert m["fd"] > 0 and m["ms_per_image"] > 0
        assert set(m["prompt_accuracy"]) == {"digit", "style", "color"}
    ratios = metrics["ratios"]
    assert ratios["unet_eval_reduction"] == 8
    assert ratios["student_fd_to_reference"] == pytest.approx(models["student_2"]["fd"] / models["teacher_8"]["fd"])
    assert [(r["teacher_steps"], r["student_steps"], r["train_steps"]) for r in metrics["rounds"]] \
        == [(8, 4, 6), (4, 2, 6)]
    plots = distilled_root / "plots" / "step_distill"
    assert (plots / "samples.png").stat().st_size > 0
    assert len((plots / "loss.tsv").read_text().splitlines()) == 1 + 12
    assert not list(out.parent.glob(".step_distill.tmp-*"))
    # The teacher folder is an input only.
    teacher_unet = distilled_root / "data" / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    student_unet = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert load_file(str(teacher_unet)).keys() == load_file(str(student_unet)).keys()


def test_student_folder_loads_offline_and_samples_at_its_step_count(distilled_root):
    out = distilled_root / "data" / "step_distill"
    sampling = read_json(out / SD.SAMPLING_FILE)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    images = pipe(CAPTIONS, num_inference_steps=sampling["num_inference_steps"],
                  guidance_scale=sampling["guidance_scale"], generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    hook.remove()
    assert images.shape == (2, 3, 16, 16)
    assert 0 <= images.min() and images.max() <= 1
    # No classifier-free guidance: one UNet pass of the two captions per step.
    assert calls == [2] * sampling["num_inference_steps"]


@pytest.mark.parametrize("teacher_steps, student_steps", [(12, 4), (4, 4), (6, 4), (2, 4)])
def test_bad_step_ratio_is_rejected_by_config(teacher_steps, student_steps):
    with pytest.raises(ConfigError, match=r"step_distill.*teacher_steps must be student_steps times a power of two"):
        _cfg(teacher_steps=teacher_steps, student_steps=student_steps)
