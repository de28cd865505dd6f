"""Structured filter pruning: remove whole channels, so the result is an ordinary smaller dense model.

Unstructured sparsity only pays off on a sparse accelerator; removing filters makes every runtime (ONNX
Runtime, XNNPACK) faster as it is, at the price of a coarser cut. `prune_filters` ranks the channels of
each coupled group (a layer's filters together with everything that must lose the same channels: the
next layers' inputs, norms, skip concatenations, residual sums; torch-pruning's dependency graph finds
them) by group L2 magnitude and removes `ratio` of them, in one shot.

The kind knows what must keep its width and which attributes go stale when layers shrink, and says so
in a `FilterSpec` (Kind.filter_spec). The layer producing the output always keeps its width.

A saved pruned model is the dense architecture's files (whose config still names the dense widths) with
smaller weights and a sidecar `filters.json`: loading builds the dense model, `resize_to` shrinks its
layers to the stored shapes and the weights load strictly. Without the sidecar a kind loads as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from condenser.core.io import read_json, write_json

SIDECAR = "filters.json"
_CONV_OR_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class FilterSpec:
    """What a kind tells the pruner about its model; keys are modules of the model it was made for.

    ignored: layers whose output channels stay, and with them every channel group they belong to.
    max_ratio: per-layer caps on the ratio, for layers the model cannot afford to thin as much.
    num_heads: attention projections and their head count: channels go evenly from every head, which
        keeps the head count (and the attention's reshapes) valid.
    channel_groups: layers whose outputs are split in equal parts that pair up position by position
        (GEGLU's value and gate halves): a channel goes from every part at once, ranked on their mean.
        torch-pruning would otherwise rank each part's channels separately and drop the union of pairs.
    fix: restores what a model derives from layer widths once they changed (a block's copy of its
        width, an attention scale). It runs on the pruned model, and in `load_resized` before the
        weights load, so it must work from shapes alone and be idempotent.
    """

    ignored: list[nn.Module] = field(default_factory=list)
    max_ratio: dict[nn.Module, float] = field(default_factory=dict)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    channel_groups: dict[nn.Module, int] = field(default_factory=dict)
    fix: Callable[[nn.Module], None] | None = None


def prune_filters(model: nn.Module, example: Mapping[str, torch.Tensor], ratio: float,
                  spec: FilterSpec) -> nn.Module:
    """A pruned copy of `model` (left untouched) with `ratio` of every prunable channel group removed,
    lowest group L2 magnitude first; `example` (batch-1 inputs, passed positionally in order) traces the
    graph, and the copy's output on it keeps the dense model's shape."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"filter pruning ratio {ratio} must be in [0, 1)")
    pruned = copy.deepcopy(model).eval()
    args = tuple(example.values())
    dense_shape, output = _output_shape_and_layer(pruned, args)
    # The spec names modules of `model`; the pruner needs the copy's.
    copies = dict(pruned.named_modules())
    twin = {module: copies[name] for name, module in model.named_modules()}
    pruner = tp.pruner.BasePruner(
        pruned, example_inputs=args, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, pruning_ratio_dict={twin[m]: min(ratio, cap) for m, cap in spec.max_ratio.items()},
        ignored_layers=[output, *(twin[m] for m in spec.ignored)],
        # Fresh dicts: the pruner updates both in place (and its default out_channel_groups is shared).
        num_heads={twin[m]: n for m, n in spec.num_heads.items()},
        out_channel_groups={twin[m]: n for m, n in spec.channel_groups.items()},
        # round_to makes GroupNorm's groups skip pruning silently (DESIGN.md); widths stay as they fall.
        round_to=None)
    pruner.step()
    if spec.fix is not None:
        spec.fix(pruned)
    try:
        shape, _ = _output_shape_and_layer(pruned, args)
    except RuntimeError as err:
        # torch-pruning keeps GroupNorm's group count and rounds each group's channels down.
        raise RuntimeError(f"the model pruned at ratio {ratio} no longer runs ({err}); a high ratio can leave "
                           "a GroupNorm fewer channels than groups: lower the ratio") from err
    if shape != dense_shape:
        raise RuntimeError(f"pruning changed the output shape {tuple(dense_shape)} -> {tuple(shape)}; add the "
                           "layers producing the output to the kind's FilterSpec.ignored")
    return pruned


def _output_shape_and_layer(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Size, nn.Module]:
    """The shape of the model's (first) output and the last conv or linear layer run: the one producing
    the output, whose width is the output's."""
    called: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, *_: called.append(m)) for m in model.modules()
             if isinstance(m, _CONV_OR_LINEAR)]
    try:
        with torch.no_grad():
            output = model(*args)
    finally:
        for hook in hooks:
            hook.remove()
    if not called:
        raise ValueError(f"{type(model).__name__} runs no conv or linear layer: it has no filters to prune")
    output = output if isinstance(output, torch.Tensor) else tp.utils.flatten_as_list(output)[0]
    return output.shape, called[-1]


def write_sidecar(model: nn.Module, dense: Callable[[], nn.Module], folder: Path) -> None:
    """If `model` is narrower than what `dense` builds (its architecture, unpruned), record in `folder`
    what its weights' shapes do not say: every norm's grouping and width. Otherwise remove a stale
    record, so the folder loads the dense way."""
    sidecar = Path(folder) / SIDECAR
    # On the meta device: shapes only, no memory, and the global random state stays as it was.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in dense().state_dict().items()}
    if all(v.shape == shapes.get(k, v.shape) for k, v in model.state_dict().items()):
        sidecar.unlink(missing_ok=True)
        return
    norms = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm):
            norms[name] = {"num_groups": m.num_groups, "num_channels": m.num_channels}
        elif isinstance(m, nn.LayerNorm):
            norms[name] = {"normalized_shape": list(m.normalized_shape)}
    write_json(sidecar, {"norms": norms})


def load_resized(dense: nn.Module, state_dict: Mapping[str, torch.Tensor], folder: Path,
                 fix: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """`dense` (freshly built from the saved config) shrunk to the pruned weights in `state_dict` and
    the norms in `folder`'s sidecar, fixed by the kind's `fix`, with the weights loaded strictly."""
    model = resize_to(dense, state_dict, read_json(Path(folder) / SIDECAR)["norms"])
    if fix is not None:
        fix(model)
    model.load_state_dict(state_dict)
    return model.eval()


def resize_to(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
              norms: Mapping[str, dict] | None = None) -> nn.Module:
    """Give each layer of `model` (in place) the shapes its parameters have in `state_dict`, values not
    loaded, and each norm its recorded width and grouping (`norms`, as write_sidecar records them)."""
    norms = norms or {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        shapes = {p: state_dict[prefix + p].shape for p, _ in m.named_parameters(recurse=False)
                  if prefix + p in state_dict}
        if any(shape != getattr(m, p).shape for p, shape in shapes.items()):
            weight = shapes.get("weight")
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and not m.transposed:
                m.out_channels, m.in_channels = weight[0], weight[1]
            elif isinstance(m, nn.Linear):
                m.out_features, m.in_features = weight
            elif isinstance(m, nn.Embedding):
                m.num_embeddings, m.embedding_dim = weight
            elif isinstance(m, nn.GroupNorm):
                m.num_channels = weight[0]
            elif isinstance(m, nn.LayerNorm):
                m.normalized_shape = tuple(weight)
            else:
                raise NotImplementedError(f"{name} ({type(m).__name__}): resize_to cannot resize this layer; "
                                          "teach condenser.compress.sparse.filters.resize_to its attributes")
            for p, shape in shapes.items():
                old = getattr(m, p)
                setattr(m, p, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                           requires_grad=old.requires_grad))
        # Norms without weights have no shapes to go by, and GroupNorm's grouping never shows in one.
        for attr, value in norms.get(name, {}).items():
            setattr(m, attr, tuple(value) if isinstance(value, list) else value)
    return model
