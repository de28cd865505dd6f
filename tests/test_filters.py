"""Filter pruning on tiny random models of both kinds: the pruned model is an ordinary smaller dense model.

It keeps the dense output shape, has fewer parameters, leaves the dense model alone, saves and loads
through its kind bit-exactly (the saved config still names the dense widths), and exports to ONNX
matching PyTorch. Built here from seeds, so a fresh clone without data/ runs it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from condenser.compress.sparse.filters import SIDECAR, FilterSpec, prune_filters, resize_to
from condenser.deliverables import KINDS
from condenser.models.common import parameter_count
from condenser.models.editor import Generator, GeneratorConfig
from condenser.runtime.measure import parity
from condenser.runtime.onnx import export_onnx

RATIO = 0.5


def _editor() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Generator(GeneratorConfig(concepts=("bold",), channels=8, blocks=2, block="resnet", code_dim=8,
                                      default="bold"))
    # The output conv starts at zero (an identity edit), which would hide every other layer's output.
    nn.init.normal_(model.out.weight, std=0.1)
    return model.eval(), {"image": torch.rand(1, 3, 8, 8) * 2 - 1}


def _unet() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # The teacher's layout (condenser.models.teacher.build_pipeline), text-time embedding included; its
    # pooling splits the text width over 64 heads, hence a width of 64.
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        attention_head_dim=8, norm_num_groups=8, cross_attention_dim=64, addition_embed_type="text")
    return model.eval(), {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([500]),
                          "encoder_hidden_states": torch.randn(1, 4, 64)}


BUILD = {"gan_editor": _editor, "sd_unet": _unet}


@pytest.fixture(scope="module", params=sorted(BUILD))
def case(request) -> tuple:
    kind = KINDS[request.param]
    dense, example = BUILD[request.param]()
    before = copy.deepcopy(dense.state_dict())
    pruned = prune_filters(dense, example, RATIO, kind.filter_spec(dense))
    return kind, dense, example, pruned, before


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pruned_model_is_smaller_with_the_dense_output_shape(case):
    kind, dense, example, pruned, before = case
    assert parameter_count(pruned) < 0.7 * parameter_count(dense)
    with torch.no_grad():
        assert kind.forward(pruned, example).shape == kind.forward(dense, example).shape
    assert _same(dense.state_dict(), before), "pruning changed the dense model"


def test_pruned_model_round_trips_through_its_kind(case, tmp_path: Path):
    kind, dense, example, pruned, _ = case
    (tmp_path / "empty").mkdir()
    source = tmp_path / "source"
    kind.save(dense, source, source=tmp_path / "empty")  # a deliverable as it comes: dense, no sidecar
    assert not list(source.rglob(SIDECAR))
    kind.save(pruned, tmp_path / "pruned", source=source)
    assert list((tmp_path / "pruned").rglob(SIDECAR))
    again = kind.load(tmp_path / "pruned")
    assert _same(pruned.state_dict(), again.state_dict())
    with torch.no_grad():
        assert torch.equal(kind.forward(pruned, example), kind.forward(again, example))
    assert _same(dense.state_dict(), kind.load(source).state_dict())


def test_pruned_model_exports_to_onnx_matching_pytorch(case, tmp_path: Path):
    kind, _, example, pruned, _ = case
    path = export_onnx(kind.exportable(pruned), tuple(example.values()), tmp_path / "pruned.onnx", list(example),
                       list(kind.output_names))
    assert parity(kind.exportable(pruned), path, example) < 1e-4


def test_unet_attention_and_feed_forwards_stay_consistent():
    """Every head loses the same channels and both attention processors agree (the query carries the dense
    softmax temperature); each GEGLU keeps as many gate as value channels, half of them."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention, AttnProcessor

    dense, example = _unet()
    pruned = prune_filters(dense, example, RATIO, KINDS["sd_unet"].filter_spec(dense))
    for (name, before), after in zip(dense.named_modules(), pruned.modules()):
        if isinstance(before, GEGLU):
            assert after.proj.out_features == before.proj.out_features // 2, name
        if isinstance(before, Attention):
            assert after.heads == before.heads and after.to_q.out_features == after.to_k.out_features
            assert after.scale == (after.to_q.out_features // after.heads) ** -0.5, name
    classic = copy.deepcopy(pruned)
    classic.set_attn_processor(AttnProcessor())
    kind = KINDS["sd_unet"]
    with torch.no_grad():
        assert torch.allclose(kind.forward(classic, example), kind.forward(pruned, example), atol=1e-5)


def test_output_layer_keeps_its_width_unnamed_and_caps_hold():
    model, example = _editor()
    pruned = prune_filters(model, example, RATIO, FilterSpec(max_ratio={model.down1: 0.0}))
    assert pruned.out.out_channels == 3 and pruned.stem.out_channels < model.stem.out_channels
    assert pruned.down1.out_channels == model.down1.out_channels


def test_bad_ratio_and_unknown_layers_fail_clearly():
    model, example = _editor()
    with pytest.raises(ValueError, match="ratio"):
        prune_filters(model, example, 1.0, FilterSpec())
    narrower = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    with pytest.raises(NotImplementedError, match="resize_to"):
        resize_to(nn.Bilinear(4, 4, 4), narrower)
