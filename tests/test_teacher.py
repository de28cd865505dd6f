"""teacher: the tiny SD pipeline trains, saves, reloads, generates, and takes a user's checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_params
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from condenser.core.config import ConfigError, parse_params
from condenser.core.io import StagePaths, read_json
from condenser.data.images import load_split
from condenser.models import teacher as T
from condenser.train.teacher import latent_scaling_factor, train_unet
from tasks import teacher as stage


def _project(prepared_root: Path, tmp: Path) -> Path:
    """A fresh project folder holding copies of the shared prepare and evaluator outputs."""
    for name in ("prepare", "evaluator"):
        shutil.copytree(prepared_root / "data" / name, tmp / "data" / name)
    return tmp


def _teacher_cfg(**overrides):
    params = tiny_params()
    params["teacher"].update(overrides)
    return parse_params(params).teacher


@pytest.fixture(scope="module")
def trained_root(prepared_root, tmp_path_factory) -> Path:
    root = _project(prepared_root, tmp_path_factory.mktemp("teacher"))
    stage.run(_teacher_cfg(), StagePaths(root))
    return root


def test_stage_writes_pipeline_manifest_metrics_and_plots(trained_root):
    out = trained_root / "data" / "teacher"
    for part in T.PIPELINE_PARTS:
        assert (out / part).exists(), part
    assert list((out / "unet").glob("*.safetensors"))
    manifest = read_json(out / "manifest.json")
    assert set(manifest["inputs"]) == {"data/prepare", "data/evaluator"}
    assert all(len(md5) == 32 for md5 in manifest["inputs"].values())
    assert manifest["params"] == _teacher_cfg().model_dump()
    assert manifest["seed"] == 0
    metrics = read_json(trained_root / "metrics" / "teacher.json")
    assert set(metrics["prompt_accuracy"]) == {"digit", "style", "color"}
    assert metrics["fd"] > 0 and metrics["fd_floor_validation_vs_test"] > 0
    assert metrics["train"]["unet_steps"] == 10
    assert metrics["parameters"]["unet"] > 0
    assert (trained_root / "plots" / "teacher" / "samples.png").stat().st_size > 0
    assert not list(out.parent.glob(".teacher.tmp-*"))


def test_saved_pipeline_loads_offline_and_generates(trained_root):
    pipe = StableDiffusionPipeline.from_pretrained(trained_root / "data" / "teacher", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a bold red handwritten seven", "a thin blue handwritten two"], num_inference_steps=3,
                  guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16)
    assert 0 <= images.min() and images.max() <= 1


def test_training_encodes_captions_as_the_pipeline_does(trained_root):
    pipe = T.load_checkpoint(trained_root / "data" / "teacher")
    caption = "a bold red handwritten seven"
    ours = T.encode_captions(pipe.text_encoder, pipe.tokenizer, [caption])
    cond, uncond = pipe.encode_prompt(caption, "cpu", 1, True, negative_prompt=None)
    torch.testing.assert_close(ours.embeddings[0], cond[0])
    torch.testing.assert_close(ours.embeddings[ours.unconditional], uncond[0])


@pytest.mark.parametrize("mode", ["finetune", "passthrough"])
def test_user_checkpoint_goes_through_the_same_path(trained_root, prepared_root, tmp_path, mode):
    checkpoint = trained_root / "data" / "teacher"
    root = _project(prepared_root, tmp_path)
    metrics = stage.run(_teacher_cfg(checkpoint=str(checkpoint), mode=mode), StagePaths(root))
    assert metrics["mode"] == mode
    before = load_file(str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(root / "data" / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == (mode == "finetune")
    assert StableDiffusionPipeline.from_pretrained(root / "data" / "teacher", local_files_only=True)
    assert read_json(root / "data" / "teacher" / "manifest.json")["inputs"][str(checkpoint)]


def test_missing_checkpoint_names_the_key(prepared_root, tmp_path):
    root = _project(prepared_root, tmp_path)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint.*no-such-model"):
        stage.run(_teacher_cfg(checkpoint=str(missing), mode="finetune"), StagePaths(root))
    assert not (root / "data" / "teacher").exists()


def test_checkpoint_folder_without_a_pipeline_names_the_key(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint.*lacks model_index\.json"):
        T.load_checkpoint(tmp_path)


def _tiny_training_run(prepared_root: Path, steps: int):
    from accelerate import Accelerator

    # Epsilon without Min-SNR weighting: its loss starts near 1 for any untrained model, a clear baseline.
    cfg = _teacher_cfg(train={"steps": steps, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5,
                              "lr_schedule": "constant", "prediction_type": "epsilon", "snr_gamma": None})
    train = load_split(prepared_root / "data" / "prepare", "train")
    text_encoder, tokenizer = T.load_text_encoder(None, cfg.max_caption_tokens)
    torch.manual_seed(cfg.seed)
    pipe = T.build_pipeline(cfg, 16, text_encoder, tokenizer)
    images = train.float_images() * 2 - 1
    latents = T.encode_latents(pipe.vae, images)
    captions = T.encode_captions(text_encoder, tokenizer, train.captions)
    return train_unet(pipe.unet, pipe.scheduler, latents, latent_scaling_factor(*latents), captions,
                      cfg.train, cfg.seed, Accelerator(cpu=True))


def test_training_lowers_the_loss_and_repeats_exactly(prepared_root):
    first = _tiny_training_run(prepared_root, 40)
    start, end = sum(first.losses[:5]) / 5, sum(first.losses[-10:]) / 10
    assert end < 0.7 * start, (start, end)
    # A constant schedule makes a shorter rerun's steps the same steps as the first run's start.
    again = _tiny_training_run(prepared_root, 10)
    assert again.losses == first.losses[:10]
