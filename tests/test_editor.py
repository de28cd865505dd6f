"""The GAN editor: generator, LoRA on chosen layers, metrics, and the gan_base and lora stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from condenser.core.config import ConfigError, check_dvc_yaml, load_params, parse_params
from condenser.core.io import StagePaths
from condenser.data.pairs import EditPairs
from condenser.distill.lora import adaptable_layers, layer_change, merged, with_lora
from condenser.models.editor import (
    DISCRIMINATOR_WEIGHTS,
    GENERATOR_WEIGHTS,
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    edit_images,
    load_generator,
    save_model,
    with_concept,
)
from condenser.quality import psnr, ssim
from condenser.runtime.onnx import export_onnx
from condenser.train.gan import train_gan
from tasks import gan_base, lora
from tests.conftest import ROOT, tiny_params

NAMES = ("bold", "recolor_blue")


def _generator(**kw) -> Generator:
    torch.manual_seed(0)
    g = Generator(GeneratorConfig(NAMES, channels=8, blocks=2, block=kw.pop("block", "resnet"), code_dim=8, **kw))
    # A trained-looking generator: the zero-initialised output conv would hide every other layer.
    torch.nn.init.normal_(g.out.weight, std=0.1)
    return g.eval()


def test_psnr_and_ssim_known_values():
    a = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr(torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.1)) == pytest.approx(20.0)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim(a, noisy) < ssim(a, (a + noisy) / 2) < 1.0
    assert ssim(a, 1 - a) < 0.2


def test_untrained_generator_is_the_identity_edit_and_reloads(tmp_path: Path):
    g = Generator(GeneratorConfig(NAMES, channels=8, blocks=1, block="inception", code_dim=8)).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(g(x, torch.tensor([0, 1, 0])), x)
    g = _generator()
    save_model(g, tmp_path)
    again = load_generator(tmp_path)
    c = torch.tensor([1, 0, 1])
    assert torch.equal(again(x, c), g(x, c)) and again.config == g.config
    with pytest.raises(FileNotFoundError, match="gan_base"):
        load_generator(tmp_path / "nowhere")


def test_a_new_concept_starts_at_the_mean_code():
    g = _generator()
    grown = with_concept(g, "italic")
    assert grown.config.concepts == (*NAMES, "italic") and g.config.concepts == NAMES
    assert torch.allclose(grown.codes.weight[-1], g.codes.weight.mean(0))
    assert torch.equal(grown.codes.weight[:-1], g.codes.weight)


def test_lora_wraps_only_the_chosen_layers_and_merges_exactly(tmp_path: Path):
    g = _generator()
    layers = ["blocks.0.conv1", "blocks.1.film", "up1"]
    model = with_lora(g, layers, rank=2, train_codes=False)
    wrapped = sorted(name.removeprefix("base_model.model.") for name, m in model.named_modules()
                     if isinstance(m, LoraLayer))
    assert wrapped == sorted(layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # B starts at zero: an untrained LoRA changes nothing. Move it, then merge.
    x, c = torch.rand(4, 3, 16, 16) * 2 - 1, torch.full((4,), 1, dtype=torch.long)
    assert torch.allclose(model(x, c), g(x, c))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    assert not torch.allclose(model(x, c), g(x, c), atol=1e-3)
    editor = merged(model, "recolor_blue")
    assert isinstance(editor, Generator) and editor.config.default == "recolor_blue"
    assert not any(isinstance(m, LoraLayer) for m in editor.modules())
    assert torch.allclose(editor(x), model(x, c), atol=1e-5)
    model.save_pretrained(str(tmp_path / "adapter"))
    save_model(editor, tmp_path / "merged")
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter < 0.1 * (tmp_path / "merged" / GENERATOR_WEIGHTS).stat().st_size


def test_layer_change_ranks_the_layer_that_moved():
    g = _generator()
    moved = with_concept(g, "bold")
    with torch.no_grad():
        moved.blocks[1].conv2.weight.mul_(1.5)
        moved.up2.weight.add_(1e-4)
    rows = layer_change(g, moved)
    assert rows[0]["layer"] == "blocks.1.conv2" and rows[0]["relative_change"] == pytest.approx(0.5)
    assert rows[1]["layer"] == "up2" and all(r["relative_change"] == 0 for r in rows[2:])
    assert {r["layer"] for r in rows} == set(adaptable_layers(g))


def test_lora_learns_an_edit_the_base_never_saw(prepared_root: Path):
    """A deterministic new edit (swap red and blue) on real prepared digits: the tiny teacher's edits are
    too noisy to show learning, this one is not. Scored on images the LoRA never trained on."""
    from condenser.data.images import load_split

    images = load_split(prepared_root / "data" / "prepare", "train").float_images()[:160] * 2 - 1
    pairs = EditPairs(images, images[:, [2, 1, 0]], ["swap"] * len(images), torch.zeros(len(images)),
                        torch.zeros(len(images)), torch.zeros(len(images)))
    train, test = pairs.subset(range(128)), pairs.subset(range(128, 160))
    base = with_concept(_generator(), "swap")
    names = base.config.concepts
    disc = Discriminator(DiscriminatorConfig(names, channels=8))
    model = with_lora(base, ["stem", "out", "up2", "blocks.1.conv2"], rank=4, train_codes=True)
    train_gan(model, disc, train, names, steps=150, batch_size=16, lr=5e-3, disc_lr=5e-4, l1_weight=100.0,
                adv_weight=1.0, seed=0)
    target = (test.edits + 1) / 2
    before = psnr(edit_images(base, test.sources, "swap", names), target)
    after = psnr(edit_images(merged(model, "swap"), test.sources, "swap", names), target)
    assert after > before + 5, (before, after)


def test_onnx_export_matches_pytorch(tmp_path: Path):
    import onnxruntime as ort

    editor = merged(with_lora(_generator(), ["up1"], 1, False), "bold")
    export_onnx(editor, (torch.zeros(1, 3, 16, 16),), tmp_path / "g.onnx", ["image"], ["edit"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {"image": x.numpy()})[0]
    assert np.abs(out - editor(x).detach().numpy()).max() < 1e-4


def test_concepts_must_have_pairs():
    raw = tiny_params()
    raw["lora"]["concepts"] = ["bold", "wavy"]
    with pytest.raises(ConfigError, match="lora.concepts: wavy not in distill_data.concepts"):
        parse_params(raw)
    raw = tiny_params()
    raw["lora"]["ranks"] = [0, 2]
    with pytest.raises(ConfigError, match="lora.ranks"):
        parse_params(raw)


def test_gan_base_stage(editor_root: Path):
    out = editor_root / "data" / "gan_base"
    generator = load_generator(out)
    assert generator.config.concepts == tuple(tiny_params()["gan_base"]["concepts"])
    assert set(load_file(str(out / DISCRIMINATOR_WEIGHTS)))
    manifest = json.loads((out / "manifest.json").read_text())
    # Only the base concepts' pairs were read: italic stays new to the base.
    assert set(manifest["inputs"]) == {"data/evaluator", "data/distill_data/bold", "data/distill_data/thin",
                                       "data/distill_data/recolor_blue"}
    metrics = json.loads((editor_root / "metrics" / "gan_base.json").read_text())
    for concept, row in metrics["concepts"].items():
        assert 5 < row["gan"]["psnr"] < 60 and 0 <= row["gan"]["concept_accuracy"] <= 1
    assert metrics["ms_per_edit_batch1"] > 0
    assert (editor_root / "plots" / "gan_base" / "edits.png").is_file()


def test_lora_stage_learns_an_unseen_concept(editor_root: Path):
    cfg = parse_params(tiny_params()).lora
    metrics = lora.run(cfg, StagePaths(editor_root), "italic")
    out = editor_root / "data" / "lora" / "italic"
    assert metrics["new_concept"]
    assert set(metrics["heldout"]) == {"teacher", "base", "lora", "full_finetune"}
    search = json.loads((out / "search.json").read_text())
    assert [t["rank"] for t in search["rank_search"]["trials"]] == sorted(cfg.ranks)
    assert [t["data_fraction"] for t in search["data_study"]["trials"]] == sorted(cfg.data_fractions)
    assert metrics["rank"] in cfg.ranks and metrics["data_fraction"] in cfg.data_fractions
    assert metrics["crucial_layers"] == search["crucial_layers"]["chosen"]
    assert len(metrics["crucial_layers"]) == cfg.crucial_layers
    # The adapter holds the chosen layers only, and is small next to the merged generator.
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == sorted(metrics["crucial_layers"])
    assert metrics["adapter_bytes"] < metrics["merged_bytes"]
    assert metrics["merge_max_abs_error"] < 1e-4
    editor = load_generator(out / "merged")
    assert editor.config.default == "italic" and (out / "merged" / "generator.onnx").is_file()
    assert metrics["heldout"]["teacher"]["ms_per_edit"] > metrics["heldout"]["lora"]["ms_per_edit"] > 0
    full = metrics["full_finetune"]
    assert full["trainable_parameters"] > metrics["adapter_parameters"] and full["train_wall_time_s"] > 0
    assert (editor_root / "plots" / "lora" / "italic.png").is_file()
    saved = json.loads((editor_root / "metrics" / "lora" / "italic.json").read_text())
    assert saved["rank"] == metrics["rank"]


def test_lora_on_a_base_concept_keeps_the_code_table_frozen(editor_root: Path):
    metrics = lora.run(parse_params(tiny_params()).lora, StagePaths(editor_root), "bold")
    assert not metrics["new_concept"]
    adapter = load_file(str(editor_root / "data" / "lora" / "bold" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)


def test_params_refuse_a_dvc_yaml_out_of_step_with_gan_base_concepts(tmp_path: Path):
    """DVC cannot expand gan_base.concepts into deps, so dvc.yaml lists the folders; loading params.yaml
    checks the two agree, before any stage works."""
    params = parse_params(tiny_params())
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gan_base": {"deps": [
        "data/distill_data/bold", "data/distill_data/thin", "tasks/gan_base.py"]}}}))
    with pytest.raises(ConfigError, match=r"dvc.yaml: stages.gan_base.deps .*gan_base.concepts"):
        check_dvc_yaml(params, tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    with pytest.raises(ConfigError, match="gan_base.concepts"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gan_base": {"deps": [
        "data/distill_data/bold", "data/distill_data/thin", "data/distill_data/recolor_blue"]}}}))
    load_params(tmp_path / "params.yaml")
    # The project's own dvc.yaml agrees with its params.yaml.
    load_params(ROOT / "params.yaml")


def test_generator_config_rejects_an_unknown_block():
    with pytest.raises(ValueError, match="block 'resnt'"):
        GeneratorConfig(NAMES, channels=8, blocks=1, block="resnt", code_dim=8)


def test_gan_base_and_lora_are_bit_identical_on_a_rerun(editor_root: Path, tmp_path: Path):
    """Same inputs, same bytes, whatever ran before in the process: every random initialisation (the
    networks, LoRA's A matrices) is seeded, since torch's default generator starts from a random seed."""
    from condenser.core.io import md5_path

    torch.manual_seed(12345)  # a different global state than when editor_root was made
    torch.rand(7)
    for sub in ("data", "metrics", "plots"):
        shutil.copytree(editor_root / sub, tmp_path / sub)
    shutil.rmtree(tmp_path / "data" / "gan_base")
    params = parse_params(tiny_params())
    gan_base.run(params.gan_base, StagePaths(tmp_path))
    assert md5_path(tmp_path / "data" / "gan_base") == md5_path(editor_root / "data" / "gan_base")
    runs = []
    for attempt in range(2):
        torch.rand(attempt + 1)
        lora.run(params.lora, StagePaths(tmp_path), "italic")
        runs.append(md5_path(tmp_path / "data" / "lora" / "italic"))
    assert runs[0] == runs[1]
