"""`sd_unet`: the UNet of a Stable Diffusion pipeline folder (the step_distill student, or any SD folder).

The UNet is what compression changes; the VAE, text encoder, tokenizer and scheduler come along
unchanged from the source folder. The sampler the deliverable ships with (`condenser.json`: steps and
guidance, written by step_distill) decides what the UNet sees: calibration runs that sampler on
training captions and records the UNet's inputs at every step, so activation ranges cover every
timestep of the schedule (Q-Diffusion's observation, the setting of the Winograd quantization paper).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condenser.compress.sparse.filters import SIDECAR, FilterSpec, load_resized, write_sidecar
from condenser.core.config import SampleParams
from condenser.core.io import read_json
from condenser.data.images import load_split
from condenser.deliverables.base import Deliverable, Deployed, Inputs, Kind
from condenser.distill.step_distill import SAMPLING_FILE
from condenser.models.judge import HEADS, load_judge
from condenser.models.teacher import load_checkpoint, sample
from condenser.quality import accuracy, fd

UNET = "unet"


class _TensorOut(nn.Module):
    """The UNet with positional inputs and a tensor output (diffusers returns a dataclass)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _DeployedUnet(Deployed):
    """The UNet as the pipeline calls it (keyword inputs, a scalar timestep, a dataclass or tuple back),
    computed by a runtime that takes (sample, timestep per example, encoder_hidden_states)."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # the runtimes here run on the CPU

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args,
                return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        t = torch.as_tensor(timestep).reshape(-1).expand(len(sample))
        out = self.run((sample, t, encoder_hidden_states))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def _fix_widths(unet: nn.Module) -> None:
    """What a UNet derives from its widths, made to match its (pruned) layers again."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    for m in unet.modules():
        if isinstance(m, (Downsample2D, Upsample2D)) and isinstance(m.conv, nn.Conv2d):
            # Their forward checks the input against this copy of the dense width.
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, Attention) and m.scale_qk:
            head_dim = m.to_q.out_features // m.heads
            if m.scale != head_dim ** -0.5:
                # Scaled dot-product attention scales by the new head width, the classic processor by
                # m.scale (the dense one). Folding the change into the queries makes both compute what
                # the dense attention computes without the removed dimensions (its softmax temperature).
                with torch.no_grad():
                    factor = (head_dim * m.scale ** 2) ** 0.5
                    m.to_q.weight.mul_(factor)
                    if m.to_q.bias is not None:
                        m.to_q.bias.mul_(factor)
                m.scale = head_dim ** -0.5
            m.inner_dim, m.inner_kv_dim = m.to_q.out_features, m.to_k.out_features


def sampling(path: Path) -> dict:
    """How the deliverable samples: its `condenser.json`, else the teacher's default sampler settings."""
    file = Path(path) / SAMPLING_FILE
    if file.is_file():
        saved = read_json(file)
        return {"steps": saved["num_inference_steps"], "guidance_scale": saved["guidance_scale"]}
    return {"steps": SampleParams().steps, "guidance_scale": SampleParams().guidance_scale}


class SdUnet(Kind):
    name = "sd_unet"
    output_names = ("prediction",)
    quality = {"fd": "lower", "prompt_accuracy": "higher"}

    def load(self, path: Path) -> nn.Module:
        from diffusers import UNet2DConditionModel

        folder = Path(path) / UNET
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no UNet here; point the deliverable at a Stable Diffusion "
                                    "folder (e.g. data/step_distill, after dvc repro step_distill)")
        if (folder / SIDECAR).is_file():
            return self._load_pruned(folder)
        return UNet2DConditionModel.from_pretrained(folder, local_files_only=True).eval()

    def _load_pruned(self, folder: Path) -> nn.Module:
        """A filter-pruned UNet: its config.json describes the dense UNet, its weights a narrower one (so
        StableDiffusionPipeline.from_pretrained cannot load the folder; set the pipeline's unet instead)."""
        from diffusers import UNet2DConditionModel
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import load_file

        dense = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
        return load_resized(dense, load_file(str(folder / SAFETENSORS_WEIGHTS_NAME)), folder,
                            self.filter_spec(dense).fix)

    def save(self, model: nn.Module, dest: Path, source: Path) -> None:
        source, dest = Path(source), Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        # Everything but the UNet (and step_distill's intermediate students and its manifest) comes along.
        for part in source.iterdir():
            if part.name in (UNET, "manifest.json") or part.name.startswith("student_"):
                continue
            (shutil.copytree if part.is_dir() else shutil.copy2)(part, dest / part.name)
        model.save_pretrained(dest / UNET, safe_serialization=True)
        write_sidecar(model, lambda: type(model).from_config(model.config), dest / UNET)

    def filter_spec(self, model: nn.Module) -> FilterSpec:
        """The text-time pooling (`add_embedding`) keeps its width, which is the text encoder's and is
        split over its own 64 heads, and with it the time embedding it is added to; the output conv keeps
        the latent channels. Attention projections lose channels evenly per head (the head count stays),
        and GEGLU projections lose value and gate channels in pairs."""
        from diffusers.models.activations import GEGLU
        from diffusers.models.attention_processor import Attention

        attentions = [m for m in model.modules() if isinstance(m, Attention)]
        return FilterSpec(
            ignored=[m for m in (model.add_embedding, model.conv_out) if m is not None],
            num_heads={proj: a.heads for a in attentions for proj in (a.to_q, a.to_k, a.to_v)},
            channel_groups={m.proj: 2 for m in model.modules() if isinstance(m, GEGLU)},
            fix=_fix_widths)

    def example_inputs(self, deliverable: Deliverable) -> Inputs:
        from transformers import AutoConfig, AutoTokenizer

        unet = self.load(deliverable.path)
        tokens = AutoTokenizer.from_pretrained(deliverable.path / "tokenizer", local_files_only=True).model_max_length
        width = AutoConfig.from_pretrained(deliverable.path / "text_encoder", local_files_only=True).hidden_size
        gen = torch.Generator().manual_seed(0)
        size = unet.config.sample_size
        return {"sample": torch.randn(1, unet.config.in_channels, size, size, generator=gen),
                # Mid-schedule: any timestep has the same shapes and cost.
                "timestep": torch.tensor([read_json(deliverable.path / "scheduler" / "scheduler_config.json")
                                          ["num_train_timesteps"] // 2]),
                "encoder_hidden_states": torch.randn(1, tokens, width, generator=gen)}

    def calibration_batches(self, deliverable: Deliverable, n: int, batch_size: int = 16,
                            seed: int = 0) -> Iterator[Inputs]:
        """One batch per UNet call of the deliverable's own sampler on `n` training captions: every
        timestep of its schedule, and with guidance both the conditional and unconditional halves."""
        pipe = load_checkpoint(deliverable.path, key=f"deliverables.{deliverable.name}.path")
        settings = sampling(deliverable.path)
        train = load_split(deliverable.data, "train")
        rows = np.sort(np.random.default_rng(seed).choice(len(train), size=min(n, len(train)), replace=False))
        captions = [train.captions[i] for i in rows]
        seen: list[Inputs] = []

        def record(_, args, kwargs):
            x = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            seen.append({"sample": x.detach().clone(),
                         "timestep": torch.as_tensor(t).reshape(-1).expand(len(x)).clone(),
                         "encoder_hidden_states": kwargs["encoder_hidden_states"].detach().clone()})

        hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
        try:
            for start in range(0, len(captions), batch_size):
                seen.clear()
                sample(pipe, captions[start:start + batch_size], settings["steps"], settings["guidance_scale"],
                       seed + start, batch_size)
                yield from list(seen)
        finally:
            hook.remove()

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        return _TensorOut(model)(*inputs.values())

    def exportable(self, model: nn.Module) -> nn.Module:
        return _TensorOut(model).eval()

    def deployed(self, model: nn.Module, run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]) -> nn.Module:
        return _DeployedUnet(model, run)

    def samples(self, model: nn.Module, deliverable: Deliverable, n: int) -> dict[str, torch.Tensor]:
        """The first n test captions sampled with the deliverable's own sampler (seeds as in `evaluate`)."""
        pipe = load_checkpoint(deliverable.path, key=f"deliverables.{deliverable.name}.path")
        pipe.unet = model.eval()
        settings = sampling(deliverable.path)
        test = load_split(deliverable.data, "test")
        n = min(n, len(test))
        images = sample(pipe, test.captions[:n], settings["steps"], settings["guidance_scale"], 0, n)
        return {"real": test.float_images()[:n], "model": images}

    def evaluate(self, model: nn.Module, deliverable: Deliverable, limit: int | None = None) -> dict:
        """FD to the real test images and prompt accuracy per head, sampling the test captions with the
        deliverable's own sampler and `model` as its UNet (the step_distill stage's protocol)."""
        pipe = load_checkpoint(deliverable.path, key=f"deliverables.{deliverable.name}.path")
        pipe.unet = model.eval()
        settings = sampling(deliverable.path)
        test = load_split(deliverable.data, "test")
        judge, _ = load_judge(deliverable.paths.data("evaluator"))
        n = min(limit or len(test), len(test))
        images = sample(pipe, test.captions[:n], settings["steps"], settings["guidance_scale"], 0, 64)
        return {"fd": fd(judge, images, test.float_images()),
                "prompt_accuracy": accuracy(judge, images, {h: getattr(test, h)[:n] for h in HEADS})}
